//! The catalogues resident in the executor, by name, with their dimension:
//! what a write that names a catalogue (or names none) is resolved against.
//! The executor keeps it current as tables come and go; the model loader
//! reads it to skip reading a resident table again, and the Kafka consumer
//! to validate item messages before they are batched.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Why a write's catalogue could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// The named catalogue is not loaded.
    Unknown(String),
    /// No catalogue was named and not exactly one is loaded.
    Ambiguous(String),
}

impl Unresolved {
    pub fn message(&self) -> &str {
        match self {
            Unresolved::Unknown(m) | Unresolved::Ambiguous(m) => m,
        }
    }
}

/// Resolves a write's catalogue among `loaded` (name, dimension): the one
/// named, or the only one loaded when none is named.
pub fn resolve<'a>(
    named: Option<&str>,
    loaded: impl Iterator<Item = (&'a str, usize)> + Clone,
) -> Result<(&'a str, usize), Unresolved> {
    let list = || {
        let names: Vec<&str> = loaded.clone().map(|(n, _)| n).collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    match named {
        Some(name) => loaded.clone().find(|(n, _)| *n == name).ok_or_else(|| {
            Unresolved::Unknown(format!(
                "unknown catalogue '{name}'; loaded catalogues: {}",
                list()
            ))
        }),
        None => {
            let mut all = loaded.clone();
            match (all.next(), all.next()) {
                (Some(only), None) => Ok(only),
                (None, _) => Err(Unresolved::Ambiguous(
                    "no catalogue is loaded: an item write needs a model serving one".into(),
                )),
                (Some(_), Some(_)) => Err(Unresolved::Ambiguous(format!(
                    "{} catalogues are loaded ({}): name the catalogue of an item write \
                     (/v1/catalogues/{{catalogue}}/items/{{item_id}}, or `catalogue` in a socket \
                     request or Kafka message)",
                    loaded.clone().count(),
                    list()
                ))),
            }
        }
    }
}

/// What a write is checked against: the catalogue's dimension and
/// attribute names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub dim: usize,
    pub attributes: Vec<String>,
}

/// Resident catalogues by name, shared between threads.
#[derive(Debug, Clone, Default)]
pub struct Catalogues(Arc<RwLock<BTreeMap<String, Shape>>>);

impl Catalogues {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether catalogue `name` is resident with dimension `dim`.
    pub fn resident(&self, name: &str, dim: usize) -> bool {
        self.0
            .read()
            .expect("catalogues lock poisoned")
            .get(name)
            .is_some_and(|s| s.dim == dim)
    }

    /// Records catalogue `name` as resident (`Some(shape)`) or gone (`None`).
    pub fn set(&self, name: &str, shape: Option<Shape>) {
        let mut g = self.0.write().expect("catalogues lock poisoned");
        match shape {
            Some(s) => {
                g.insert(name.to_string(), s);
            }
            None => {
                g.remove(name);
            }
        }
    }

    /// The catalogue a write names (or the only one), with its shape.
    pub fn resolve(&self, named: Option<&str>) -> Result<(String, Shape), Unresolved> {
        let g = self.0.read().expect("catalogues lock poisoned");
        let (name, _) = resolve(named, g.iter().map(|(n, s)| (n.as_str(), s.dim)))?;
        Ok((name.to_string(), g[name].clone()))
    }

    pub fn names(&self) -> Vec<String> {
        let g = self.0.read().expect("catalogues lock poisoned");
        g.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_resolves_to_the_named_or_the_only_catalogue() {
        let c = Catalogues::new();
        let shape = |dim| Shape {
            dim,
            attributes: vec!["in_stock".into()],
        };
        assert!(matches!(c.resolve(None), Err(Unresolved::Ambiguous(_))));
        c.set("videos", Some(shape(4)));
        assert_eq!(c.resolve(None), Ok(("videos".into(), shape(4))));
        assert_eq!(c.resolve(Some("videos")), Ok(("videos".into(), shape(4))));
        c.set("creators", Some(shape(4)));
        match c.resolve(None) {
            Err(Unresolved::Ambiguous(m)) => {
                assert!(
                    m.contains("2 catalogues are loaded (creators, videos)"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        match c.resolve(Some("music")) {
            Err(Unresolved::Unknown(m)) => assert!(
                m.contains("unknown catalogue 'music'") && m.contains("creators, videos"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(c.resident("creators", 4) && !c.resident("creators", 8));
        c.set("creators", None);
        assert_eq!(c.resolve(None), Ok(("videos".into(), shape(4))));
    }
}
