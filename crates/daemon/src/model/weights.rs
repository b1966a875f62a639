//! Tower weights: `tower.<i>.weight` [out, in] and `tower.<i>.bias` [out] for
//! i = 0, 1, ... in a safetensors file, checked against the model spec at load.

use std::any::Any;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};

use super::{ModelError, ModelSpec};

/// A version's weights as its kind loaded them (a [`TowerWeights`], or a
/// kind's own type), read back by each backend's forward pass for the kind.
/// Cheap to clone.
#[derive(Clone)]
pub struct Weights(Arc<dyn Any + Send + Sync>);

impl Weights {
    pub fn new<T: Any + Send + Sync>(weights: T) -> Self {
        Self(Arc::new(weights))
    }

    /// The weights as `T`, when they are a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Weights(..)")
    }
}

/// One Linear layer, row-major `weight[out][in]`.
#[derive(Debug, Clone)]
pub struct Layer {
    pub out_dim: usize,
    pub in_dim: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Linear layers with ReLU between them and none after the last.
#[derive(Debug, Clone)]
pub struct TowerWeights {
    pub layers: Vec<Layer>,
}

impl TowerWeights {
    pub fn load(path: &Path, spec: &ModelSpec) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut layers = Vec::new();
        let mut in_dim = spec.input_dim();
        loop {
            let i = layers.len();
            let wname = format!("tower.{i}.weight");
            let bname = format!("tower.{i}.bias");
            if st.tensor(&wname).is_err() {
                break;
            }
            let w = st.tensor(&wname).expect("checked just above");
            let shape = w.shape().to_vec();
            if shape.len() != 2 || shape[1] != in_dim {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    tensor: wname,
                    expected: format!("[out, {in_dim}]"),
                    actual: shape,
                });
            }
            let out_dim = shape[0];
            let weight = f32_values(path, &wname, &w)?;
            let b = st.tensor(&bname).map_err(|_| ModelError::MissingTensor {
                path: path.to_path_buf(),
                tensor: bname.clone(),
            })?;
            if b.shape() != [out_dim] {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    tensor: bname,
                    expected: format!("[{out_dim}]"),
                    actual: b.shape().to_vec(),
                });
            }
            let bias = f32_values(path, &bname, &b)?;
            layers.push(Layer {
                out_dim,
                in_dim,
                weight,
                bias,
            });
            in_dim = out_dim;
        }
        let Some(last) = layers.last() else {
            return Err(ModelError::MissingTensor {
                path: path.to_path_buf(),
                tensor: "tower.0.weight".into(),
            });
        };
        if last.out_dim != spec.output_dim() {
            let i = layers.len() - 1;
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                tensor: format!("tower.{i}.weight"),
                expected: format!("[{}, {}]", spec.output_dim(), last.in_dim),
                actual: vec![last.out_dim, last.in_dim],
            });
        }
        Ok(Self { layers })
    }
}

/// Reads an f32 tensor, rejecting other dtypes and non-finite values.
pub(crate) fn f32_values(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Vec<f32>, ModelError> {
    if view.dtype() != Dtype::F32 {
        return Err(ModelError::Dtype {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected: "F32".into(),
            actual: format!("{:?}", view.dtype()),
        });
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
        return Err(ModelError::Values {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            message: format!("element {pos} is {}, values must be finite", values[pos]),
        });
    }
    Ok(values)
}
