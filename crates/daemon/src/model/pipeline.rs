//! `kind = "pipeline"`: retrieval → ranking in one call. A pipeline has no
//! weights of its own: its model.toml names a retrieval model (two-tower or
//! sequential) that proposes `candidates` items and a ranker that orders
//! them; both are models of the repository, batched, versioned and split
//! as they are on their own.

use std::path::Path;

use serde::Deserialize;

use super::spec::LimitsSpec;
use super::ModelError;
use crate::toml_doc::Doc;

pub const PIPELINE: &str = "pipeline";

const KEYS: &[&str] = &["kind", "retrieve", "candidates", "rank", "limits"];

/// Most candidates a retrieval stage may hand to the ranker.
pub const MAX_CANDIDATES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PipelineSpec {
    /// The retrieval model's name.
    pub retrieve: String,
    /// How many items the retrieval stage returns for the ranker.
    #[serde(default = "default_candidates")]
    pub candidates: usize,
    /// The ranker's name.
    pub rank: String,
    #[serde(default)]
    pub limits: LimitsSpec,
}

fn default_candidates() -> usize {
    200
}

/// Whether model.toml's text declares a pipeline.
pub fn is_pipeline(text: &str) -> bool {
    Doc::parse(text).is_ok_and(|d| d.string("kind") == Some(PIPELINE))
}

impl PipelineSpec {
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        super::spec::read_with(path, Self::parse)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let doc = Doc::parse(text)?;
        doc.refuse_unknown(KEYS.iter().copied())?;
        #[derive(Deserialize)]
        struct WithKind {
            #[allow(dead_code)]
            kind: String,
            #[serde(flatten)]
            spec: PipelineSpec,
        }
        let spec = doc.part::<WithKind>()?.spec;
        if spec.candidates == 0 || spec.candidates > MAX_CANDIDATES {
            return Err(format!(
                "candidates must be between 1 and {MAX_CANDIDATES}, got {}",
                spec.candidates
            ));
        }
        if spec.limits.max_k == 0 {
            return Err("limits.max_k must be > 0, got 0".into());
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_names_its_stages_and_nothing_else() {
        let text = "kind = \"pipeline\"\nretrieve = \"videos\"\nrank = \"videos-ranker\"\n";
        assert!(is_pipeline(text));
        let spec = PipelineSpec::parse(text).unwrap();
        assert_eq!(
            (spec.retrieve.as_str(), spec.candidates, spec.rank.as_str()),
            ("videos", 200, "videos-ranker")
        );
        let more =
            PipelineSpec::parse(&format!("{text}candidates = 50\n[limits]\nmax_k = 20\n")).unwrap();
        assert_eq!((more.candidates, more.limits.max_k), (50, 20));
        let typo = PipelineSpec::parse(&format!("{text}candidate = 50\n")).unwrap_err();
        assert!(typo.contains("candidate"), "{typo}");
        let dim = PipelineSpec::parse(&format!("{text}dim = 64\n")).unwrap_err();
        assert!(dim.contains("dim"), "{dim}");
        let zero = PipelineSpec::parse(&format!("{text}candidates = 0\n")).unwrap_err();
        assert_eq!(zero, "candidates must be between 1 and 10000, got 0");
        assert!(PipelineSpec::parse("kind = \"pipeline\"\nretrieve = \"a\"\n").is_err());
        assert!(!is_pipeline("kind = \"two_tower\"\n"));
    }
}
