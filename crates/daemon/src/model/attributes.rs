//! A catalogue's integer attributes: one i64 column per attribute name,
//! aligned with the item table's rows, read from `attributes.safetensors`
//! beside the items file and written with the items. A recommend's filter
//! is resolved against them into a [`RowFilter`] that the top-k scans test
//! a row with before it may enter a list.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use super::items::{read_header, read_le_values};
use super::ModelError;
use rankd_client::types::Filter;

/// The file beside a catalogue's items file that holds its attributes.
pub const ATTRIBUTES_FILE: &str = "attributes.safetensors";

/// Most values one attribute of a filter may list.
pub const MAX_FILTER_VALUES: usize = 1024;

/// Most attributes one filter may name.
pub const MAX_FILTER_ATTRIBUTES: usize = 32;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attributes {
    names: Vec<String>,
    /// One column per name, one value per table row.
    columns: Vec<Vec<i64>>,
}

impl Attributes {
    /// Columns by name (sorted by name here), all of one length.
    pub fn new(columns: Vec<(String, Vec<i64>)>) -> Result<Self, String> {
        let mut columns = columns;
        columns.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = columns.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(format!("attribute '{}' given twice", w[0].0));
        }
        if let Some((name, c)) = columns.iter().find(|c| c.1.len() != columns[0].1.len()) {
            return Err(format!(
                "attribute '{name}' has {} values, '{}' {}",
                c.len(),
                columns[0].0,
                columns[0].1.len()
            ));
        }
        let (names, columns) = columns.into_iter().unzip();
        Ok(Self { names, columns })
    }

    /// Reads `path`: every tensor is an attribute, I64 of shape [rows],
    /// read straight into its column (no copy of the file is held).
    pub fn load(path: &Path, rows: usize) -> Result<Self, ModelError> {
        let io = |e: std::io::Error| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let (data_start, metadata) = read_header(path, &mut file, len)?;
        let mut names = metadata.offset_keys();
        names.sort();
        let mut out = Attributes::default();
        for name in names {
            let info = metadata.info(&name).expect("a listed tensor");
            if info.dtype != Dtype::I64 {
                return Err(ModelError::Dtype {
                    path: path.to_path_buf(),
                    tensor: name,
                    expected: "I64".into(),
                    actual: format!("{:?}", info.dtype),
                });
            }
            if info.shape != [rows] {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    tensor: name,
                    expected: format!("[{rows}] (one value per item of the items file)"),
                    actual: info.shape.clone(),
                });
            }
            let mut column = vec![0i64; rows];
            read_le_values(
                &mut file,
                data_start + info.data_offsets.0 as u64,
                &mut column,
            )
            .map_err(io)?;
            out.names.push(name);
            out.columns.push(column);
        }
        Ok(out)
    }

    /// Attribute names, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Rows the columns hold.
    pub fn rows(&self) -> Option<usize> {
        self.columns.first().map(Vec::len)
    }

    /// One attribute's values, one per row.
    pub fn column(&self, attribute: usize) -> &[i64] {
        &self.columns[attribute]
    }

    pub fn value(&self, attribute: usize, row: usize) -> i64 {
        self.columns[attribute][row]
    }

    /// A new row, every attribute 0.
    pub fn push_row(&mut self) {
        self.columns.iter_mut().for_each(|c| c.push(0));
    }

    pub fn set(&mut self, attribute: usize, row: usize, value: i64) {
        self.columns[attribute][row] = value;
    }

    /// A row's values by name.
    pub fn row(&self, row: usize) -> BTreeMap<String, i64> {
        self.names
            .iter()
            .zip(&self.columns)
            .map(|(n, c)| (n.clone(), c[row]))
            .collect()
    }

    /// Resolves `values` (name → value) to attribute indices; an unknown
    /// name is refused, naming the catalogue's attributes.
    pub fn resolve_values(
        &self,
        values: &BTreeMap<String, i64>,
        catalogue: &str,
    ) -> Result<Vec<(usize, i64)>, String> {
        values
            .iter()
            .map(|(name, &v)| {
                self.index(name)
                    .map(|a| (a, v))
                    .ok_or_else(|| self.unknown(name, catalogue))
            })
            .collect()
    }

    fn unknown(&self, name: &str, catalogue: &str) -> String {
        unknown_attribute(name, catalogue, &self.names)
    }
}

/// The error for an attribute name catalogue `catalogue` (whose attributes
/// are `names`) lacks.
pub fn unknown_attribute(name: &str, catalogue: &str, names: &[String]) -> String {
    let has = if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    };
    format!("unknown attribute '{name}'; catalogue '{catalogue}' has: {has}")
}

/// Checks a filter's shape before it is queued: at most
/// [`MAX_FILTER_ATTRIBUTES`] attributes, each with 1 ..= [`MAX_FILTER_VALUES`]
/// values.
pub fn check_filter(filter: &Filter) -> Result<(), String> {
    if filter.len() > MAX_FILTER_ATTRIBUTES {
        return Err(format!(
            "filter must name <= {MAX_FILTER_ATTRIBUTES} attributes, got {}",
            filter.len()
        ));
    }
    for (name, values) in filter {
        let n = values.values().len();
        if n == 0 {
            return Err(format!(
                "filter.{name} must list at least one value, got an empty list"
            ));
        }
        if n > MAX_FILTER_VALUES {
            return Err(format!(
                "filter.{name} must list <= {MAX_FILTER_VALUES} values, got {n}"
            ));
        }
    }
    Ok(())
}

/// A filter resolved against a catalogue's attributes: every clause's
/// attribute must hold one of its (sorted) values.
#[derive(Debug, Clone, PartialEq)]
pub struct RowFilter {
    clauses: Vec<(usize, Vec<i64>)>,
}

impl RowFilter {
    pub fn resolve(
        filter: &Filter,
        attributes: &Attributes,
        catalogue: &str,
    ) -> Result<Self, String> {
        let clauses = filter
            .iter()
            .map(|(name, values)| {
                let a = attributes
                    .index(name)
                    .ok_or_else(|| attributes.unknown(name, catalogue))?;
                let mut v = values.values().to_vec();
                v.sort_unstable();
                v.dedup();
                Ok((a, v))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { clauses })
    }

    /// The clauses: (attribute index, its allowed values sorted and
    /// distinct); a row passes when it holds one of each clause's values.
    pub fn clauses(&self) -> &[(usize, Vec<i64>)] {
        &self.clauses
    }

    /// Whether row `row` passes.
    #[inline]
    pub fn allows(&self, attributes: &Attributes, row: usize) -> bool {
        self.clauses.iter().all(|(a, values)| {
            let v = attributes.columns[*a][row];
            match values.len() {
                1 => values[0] == v,
                _ => values.binary_search(&v).is_ok(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankd_client::types::FilterValues;
    use safetensors::Dtype;

    fn attrs() -> Attributes {
        Attributes {
            names: vec!["category".into(), "in_stock".into()],
            columns: vec![vec![3, 7, 3, 9], vec![1, 1, 0, 1]],
        }
    }

    #[test]
    fn a_filter_holds_when_every_attribute_holds_one_of_its_values() {
        let a = attrs();
        let f: Filter = [
            ("in_stock".to_string(), FilterValues::One(1)),
            ("category".to_string(), FilterValues::Any(vec![9, 3, 3])),
        ]
        .into();
        let rf = RowFilter::resolve(&f, &a, "c").unwrap();
        let passing: Vec<usize> = (0..4).filter(|&r| rf.allows(&a, r)).collect();
        assert_eq!(passing, [0, 3]);
        let unknown: Filter = [("colour".to_string(), FilterValues::One(1))].into();
        assert_eq!(
            RowFilter::resolve(&unknown, &a, "videos").unwrap_err(),
            "unknown attribute 'colour'; catalogue 'videos' has: category, in_stock"
        );
        assert!(RowFilter::resolve(&unknown, &Attributes::default(), "v")
            .unwrap_err()
            .ends_with("has: none"));
    }

    /// Columns load by name; a column of another dtype or length fails
    /// naming the file and the tensor.
    #[test]
    fn attribute_files_load_and_bad_columns_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]| {
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
                .iter()
                .map(|(n, d, shape, data)| {
                    (
                        n.to_string(),
                        safetensors::tensor::TensorView::new(*d, shape.clone(), data).unwrap(),
                    )
                })
                .collect();
            let path = dir.path().join(name);
            std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
            path
        };
        let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let good = write(
            "a.safetensors",
            &[
                ("in_stock", Dtype::I64, vec![3], i64s(&[1, 0, 1])),
                ("category", Dtype::I64, vec![3], i64s(&[-5, 7, i64::MAX])),
            ],
        );
        let a = Attributes::load(&good, 3).unwrap();
        assert_eq!(a.names(), ["category", "in_stock"]);
        assert_eq!(
            a.row(2),
            [
                ("category".to_string(), i64::MAX),
                ("in_stock".to_string(), 1)
            ]
            .into()
        );
        let e = Attributes::load(&good, 4).unwrap_err().to_string();
        assert!(
            e.contains("a.safetensors") && e.contains("category") && e.contains("[4]"),
            "{e}"
        );
        let f32s = write(
            "b.safetensors",
            &[("x", Dtype::F32, vec![1], 1f32.to_le_bytes().to_vec())],
        );
        let e = Attributes::load(&f32s, 1).unwrap_err().to_string();
        assert!(e.contains("b.safetensors") && e.contains("I64"), "{e}");
    }

    #[test]
    fn filter_shapes_are_bounded() {
        let empty: Filter = [("a".to_string(), FilterValues::Any(vec![]))].into();
        assert!(check_filter(&empty)
            .unwrap_err()
            .contains("filter.a must list at least one"));
        let big: Filter = [(
            "a".to_string(),
            FilterValues::Any((0..MAX_FILTER_VALUES as i64 + 1).collect()),
        )]
        .into();
        assert_eq!(
            check_filter(&big).unwrap_err(),
            "filter.a must list <= 1024 values, got 1025"
        );
    }
}
