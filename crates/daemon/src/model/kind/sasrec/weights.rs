//! A SASRec checkpoint, by the reference implementation's state_dict names:
//! the PyTorch file itself (`.pth`/`.pt`, the zip format `torch.save`
//! writes, read without Python) or a `.safetensors` file with the same
//! names. Every tensor the model needs is checked for presence, dtype (f32),
//! shape and finite values, and an error names the file and the tensor;
//! tensors the model does not use are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::SasrecOptions;
use crate::model::{ItemTable, ModelError};

/// A layer norm's scale and shift, `d` each.
#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// One self-attention block. Matrices are row-major `[out][in]`, as PyTorch
/// stores them (`x Wᵀ + b`).
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub attn_norm: Norm,
    /// `[3d][d]`: the Q, K and V projections one after the other.
    pub in_proj_weight: Vec<f32>,
    pub in_proj_bias: Vec<f32>,
    pub out_proj_weight: Vec<f32>,
    pub out_proj_bias: Vec<f32>,
    pub ffn_norm: Norm,
    /// `conv1`/`conv2` of kernel size 1, as `[d][d]` matrices.
    pub conv1_weight: Vec<f32>,
    pub conv1_bias: Vec<f32>,
    pub conv2_weight: Vec<f32>,
    pub conv2_bias: Vec<f32>,
}

#[derive(Debug)]
pub struct SasrecWeights {
    pub dim: usize,
    /// The window L.
    pub history_len: usize,
    pub options: SasrecOptions,
    /// The embedding of padding positions: `item_emb.weight` row 0 when the
    /// file holds it, else zeros.
    pub padding: Vec<f32>,
    /// `pos_emb.weight`, `[L + 1][d]` (row 0: padding positions).
    pub pos_emb: Vec<f32>,
    pub blocks: Vec<BlockWeights>,
    pub last_norm: Norm,
    /// `item_emb.weight` rows 1..N when model.toml serves them as the
    /// catalogue (`items = "item_emb"`); taken once, into the item table.
    item_rows: Mutex<Option<(usize, Vec<f32>)>>,
    path: PathBuf,
}

/// The tensors of a checkpoint, by name.
struct Checkpoint<'p> {
    path: &'p Path,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint<'_> {
    fn read(path: &Path) -> Result<Checkpoint<'_>, ModelError> {
        let format = |message: String| ModelError::Format {
            path: path.to_path_buf(),
            message,
        };
        if !path.exists() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                message: "no such file".into(),
            });
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let tensors: HashMap<String, Tensor> = match ext {
            "pth" | "pt" => candle_core::pickle::read_all(path)
                .map_err(|e| format(format!("not a PyTorch state_dict file: {e}")))?
                .into_iter()
                .collect(),
            "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| format(e.to_string()))?,
            other => {
                return Err(format(format!(
                    "weights must be a .pth or .pt file (torch.save) or a .safetensors file, got extension `{other}`"
                )))
            }
        };
        if tensors.is_empty() {
            return Err(format(
                "no tensors at the top level of the file: a state_dict is expected \
                 (torch.save(model.state_dict())), not a checkpoint that nests one"
                    .into(),
            ));
        }
        Ok(Checkpoint { path, tensors })
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor `name`, of shape `shape`, f32, every value finite.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let path = self.path.to_path_buf();
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: path.clone(),
                tensor: name.to_string(),
            })?;
        if t.dtype() != DType::F32 {
            return Err(ModelError::Dtype {
                path,
                tensor: name.to_string(),
                expected: "F32".into(),
                actual: format!("{:?}", t.dtype()).to_uppercase(),
            });
        }
        if t.dims() != shape {
            return Err(ModelError::Shape {
                path,
                tensor: name.to_string(),
                expected: format!("{shape:?}"),
                actual: t.dims().to_vec(),
            });
        }
        let values = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| ModelError::Values {
                path: path.clone(),
                tensor: name.to_string(),
                message: e.to_string(),
            })?;
        if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Values {
                path,
                tensor: name.to_string(),
                message: format!("element {pos} is {}, values must be finite", values[pos]),
            });
        }
        Ok(values)
    }

    fn norm(&self, prefix: &str, d: usize) -> Result<Norm, ModelError> {
        Ok(Norm {
            weight: self.get(&format!("{prefix}.weight"), &[d])?,
            bias: self.get(&format!("{prefix}.bias"), &[d])?,
        })
    }

    /// Row 0 of `item_emb.weight` alone (the table is another file): the
    /// other rows are neither copied nor checked.
    fn padding_row(&self, d: usize) -> Result<Vec<f32>, ModelError> {
        const NAME: &str = "item_emb.weight";
        let t = &self.tensors[NAME];
        let dims = t.dims().to_vec();
        if dims.len() != 2 || dims[0] == 0 || dims[1] != d {
            return Err(ModelError::Shape {
                path: self.path.to_path_buf(),
                tensor: NAME.into(),
                expected: format!("[N + 1, {d}]"),
                actual: dims,
            });
        }
        let row = t.narrow(0, 0, 1).map_err(|e| ModelError::Values {
            path: self.path.to_path_buf(),
            tensor: NAME.into(),
            message: e.to_string(),
        })?;
        let mut one = Checkpoint {
            path: self.path,
            tensors: HashMap::new(),
        };
        one.tensors.insert(NAME.into(), row);
        one.get(NAME, &[1, d])
    }

    /// `item_emb.weight`, `[N + 1][d]` for any N ≥ 0.
    fn item_emb(&self, d: usize) -> Result<(usize, Vec<f32>), ModelError> {
        const NAME: &str = "item_emb.weight";
        let rows = match self.tensors.get(NAME).map(|t| t.dims().to_vec()) {
            Some(dims) if dims.len() == 2 && dims[0] >= 1 && dims[1] == d => dims[0],
            Some(dims) => {
                return Err(ModelError::Shape {
                    path: self.path.to_path_buf(),
                    tensor: NAME.into(),
                    expected: format!("[N + 1, {d}]"),
                    actual: dims,
                })
            }
            None => 1,
        };
        Ok((rows - 1, self.get(NAME, &[rows, d])?))
    }
}

impl SasrecWeights {
    /// Reads the checkpoint at `path` for a model of dimension `dim` and
    /// window `history_len`. `embedded`: `items = "item_emb"`, so the file
    /// must hold `item_emb.weight`, whose rows 1..N become the catalogue.
    pub fn load(
        path: &Path,
        dim: usize,
        history_len: usize,
        options: SasrecOptions,
        embedded: bool,
    ) -> Result<Self, ModelError> {
        let ck = Checkpoint::read(path)?;
        let d = dim;
        // First: its shape bounds `dim` by what the file really holds.
        let pos_emb = ck.get("pos_emb.weight", &[history_len + 1, d])?;
        let (padding, item_rows) = if embedded {
            let (n, mut all) = ck.item_emb(d)?;
            let rows = all.split_off(d);
            (all, Some((n, rows)))
        } else if ck.has("item_emb.weight") {
            (ck.padding_row(d)?, None)
        } else {
            (vec![0.0; d], None)
        };
        let blocks = (0..options.blocks)
            .map(|i| {
                Ok(BlockWeights {
                    attn_norm: ck.norm(&format!("attention_layernorms.{i}"), d)?,
                    in_proj_weight: ck
                        .get(&format!("attention_layers.{i}.in_proj_weight"), &[3 * d, d])?,
                    in_proj_bias: ck
                        .get(&format!("attention_layers.{i}.in_proj_bias"), &[3 * d])?,
                    out_proj_weight: ck
                        .get(&format!("attention_layers.{i}.out_proj.weight"), &[d, d])?,
                    out_proj_bias: ck.get(&format!("attention_layers.{i}.out_proj.bias"), &[d])?,
                    ffn_norm: ck.norm(&format!("forward_layernorms.{i}"), d)?,
                    conv1_weight: ck
                        .get(&format!("forward_layers.{i}.conv1.weight"), &[d, d, 1])?,
                    conv1_bias: ck.get(&format!("forward_layers.{i}.conv1.bias"), &[d])?,
                    conv2_weight: ck
                        .get(&format!("forward_layers.{i}.conv2.weight"), &[d, d, 1])?,
                    conv2_bias: ck.get(&format!("forward_layers.{i}.conv2.bias"), &[d])?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let last_norm = ck.norm("last_layernorm", d)?;
        Ok(Self {
            dim,
            history_len,
            options,
            padding,
            pos_emb,
            blocks,
            last_norm,
            item_rows: Mutex::new(item_rows),
            path: path.to_path_buf(),
        })
    }

    /// The catalogue `items = "item_emb"` names: rows 1..N of
    /// `item_emb.weight` with ids 1..N. Taken once: the weights do not keep
    /// a second copy of the table.
    pub fn take_item_table(&self) -> Result<ItemTable, ModelError> {
        let (n, rows) = self
            .item_rows
            .lock()
            .expect("item rows lock poisoned")
            .take()
            .expect("the embedded item table is taken once per load: this is a bug");
        ItemTable::new(self.dim, (1..=n as u64).collect(), rows).map_err(|message| {
            ModelError::Values {
                path: self.path.clone(),
                tensor: "item_emb.weight".into(),
                message,
            }
        })
    }
}
