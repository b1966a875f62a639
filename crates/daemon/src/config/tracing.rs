//! Request tracing: OpenTelemetry spans of requests, the batches they ran
//! in and applied update batches, exported over OTLP/HTTP. Off unless an
//! endpoint is given.

use serde::{Deserialize, Serialize};

use super::off_if_empty;
use super::setting::settings;

settings! {
    pub struct TracingConfig, flags TracingArgs under "Tracing" {
        // A URL that names a path is posted to as it is.
        /// Export request, batch and update spans to this OpenTelemetry
        /// collector (OTLP over HTTP, e.g. http://collector:4318; spans go to
        /// its /v1/traces)
        otlp_endpoint: Option<String> = None, unset "off", flag "URL": String => off_if_empty;
        /// Encoding of the exported spans: http/protobuf or http/json
        otlp_protocol: OtlpProtocol = OtlpProtocol::HttpProtobuf, flag "PROTOCOL";
    }
}

/// How spans are encoded on the wire (OTLP's own names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "http/protobuf")]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    #[value(name = "http/json")]
    HttpJson,
}

impl TracingConfig {
    /// The URL spans are posted to: the endpoint as given when it names a
    /// path, else its `/v1/traces`.
    pub fn traces_url(&self) -> Option<String> {
        let endpoint = self.otlp_endpoint.as_deref()?;
        let rest = endpoint.strip_prefix("http://").unwrap_or(endpoint);
        Some(match rest.find('/') {
            Some(i) if rest[i..] != *"/" => endpoint.to_string(),
            _ => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        })
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        let Some(endpoint) = &self.otlp_endpoint else {
            return Ok(());
        };
        anyhow::ensure!(
            cfg!(feature = "otlp"),
            "otlp_endpoint is set ({endpoint}) but this rankd was built without the `otlp` feature"
        );
        let Some(host) = endpoint.strip_prefix("http://") else {
            anyhow::bail!(
                "otlp_endpoint must be an http:// URL (OTLP over HTTP, no TLS), got '{endpoint}'"
            );
        };
        anyhow::ensure!(
            !host.is_empty() && !host.starts_with('/'),
            "otlp_endpoint must name a host, got '{endpoint}'"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(endpoint: &str) -> TracingConfig {
        TracingConfig {
            otlp_endpoint: Some(endpoint.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_bare_endpoint_gets_the_traces_path_and_a_full_url_is_kept() {
        assert_eq!(
            with("http://c:4318").traces_url().unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            with("http://c:4318/").traces_url().unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            with("http://c:4318/otlp/v1/traces").traces_url().unwrap(),
            "http://c:4318/otlp/v1/traces"
        );
        assert_eq!(TracingConfig::default().traces_url(), None);
    }

    #[test]
    fn an_endpoint_that_is_not_plain_http_is_refused_naming_it() {
        let e = with("https://c:4318").validate().unwrap_err().to_string();
        assert!(e.contains("https://c:4318"), "{e}");
        assert!(with("c:4318").validate().is_err());
        assert!(with("http://").validate().is_err());
        assert!(TracingConfig::default().validate().is_ok());
    }
}
