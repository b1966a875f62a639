//! Comparing rankd's answers with a framework's (PyTorch) fixtures: numbers
//! read from the fixture JSON, and the tolerance every parity test states.

use serde_json::Value;

/// The numbers of a JSON array.
pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or_else(|| panic!("not a number: {x}")))
        .collect()
}

/// Within 1e-5 of the framework's value, relative to it past magnitude 1.
pub fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 * want.abs().max(1.0)
}
