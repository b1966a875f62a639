//! A rankd built without the `otlp` feature refuses an OTLP endpoint at
//! start, naming the feature, rather than serving without the spans asked for.

use crate::common::*;

#[test]
fn an_otlp_endpoint_is_refused_without_the_otlp_feature() {
    let out = serve_output(&["--otlp-endpoint", "http://127.0.0.1:4318"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without the `otlp` feature") && err.contains("http://127.0.0.1:4318"),
        "{err}"
    );
}
