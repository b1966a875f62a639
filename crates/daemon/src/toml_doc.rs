//! TOML documents read in parts: a document is parsed once, each part (a
//! config section, a model kind's own keys) deserializes what it knows from
//! it, and a key that no part knows is refused here at its line and column.
//! `#[serde(flatten)]` would lose where a wrong value is, and each part's
//! `deny_unknown_fields` would refuse the other parts' keys.

use toml::de::DeTable;
use toml::Spanned;

/// A parsed document and its text (for the line and column of errors).
pub struct Doc<'t> {
    text: &'t str,
    table: Spanned<DeTable<'t>>,
}

impl<'t> Doc<'t> {
    pub fn parse(text: &'t str) -> Result<Self, String> {
        let table = DeTable::parse(text).map_err(|e| e.to_string())?;
        Ok(Self { text, table })
    }

    /// Refuses the first top-level key that is not in `known`, naming its
    /// line and column and every known key.
    pub fn refuse_unknown<'k>(
        &self,
        known: impl IntoIterator<Item = &'k str>,
    ) -> Result<(), String> {
        let known: Vec<&str> = known.into_iter().collect();
        let Some(key) = self
            .table
            .get_ref()
            .keys()
            .find(|k| !known.contains(&k.get_ref().as_ref()))
        else {
            return Ok(());
        };
        let (line, column) = self.position(key.span().start);
        let expected: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
        Err(format!(
            "unknown field `{}` at line {line}, column {column}, expected one of {}",
            key.get_ref(),
            expected.join(", ")
        ))
    }

    /// The top-level string value of `key`, if it is one.
    pub fn string(&self, key: &str) -> Option<&str> {
        self.table
            .get_ref()
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .and_then(|(_, v)| v.get_ref().as_str())
    }

    /// Deserializes one part from the whole document (keys it does not know
    /// are left to the others); errors point into the text.
    pub fn part<S: serde::de::DeserializeOwned>(&self) -> Result<S, String> {
        S::deserialize(toml::de::Deserializer::from(self.table.clone())).map_err(|mut e| {
            e.set_input(Some(self.text));
            e.to_string()
        })
    }

    /// 1-based line and column of byte offset `at`.
    fn position(&self, at: usize) -> (usize, usize) {
        let before = &self.text[..at];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (
            before.matches('\n').count() + 1,
            before[line_start..].chars().count() + 1,
        )
    }
}
