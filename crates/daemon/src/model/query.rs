//! What a request asks of a model (`Op`) and how a batch hands it to a
//! backend (`Query`, `Task`): plain data shared by the model kinds, the
//! backends and the executor, so each of them depends only on `model`.

/// What a scoring request asks for.
#[derive(Debug, Clone)]
pub enum Op {
    Recommend {
        user_id: u64,
        k: usize,
        exclude: Vec<u64>,
        /// Attribute → allowed values; checked against the catalogue when
        /// the request is prepared.
        filter: Option<rankd_client::types::Filter>,
        /// Whether the answer counts as an impression for online evaluation.
        online: bool,
        /// The request's context, `context_dim` long (checked at admission).
        context: Option<Vec<f32>>,
    },
    Score {
        user_id: u64,
        items: Vec<u64>,
        context: Option<Vec<f32>>,
    },
}

/// The route of an `Op`, without its data: what a model kind accepts or
/// refuses before a request is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Recommend,
    Score,
}

impl Op {
    /// The user the request is for.
    pub fn user_id(&self) -> u64 {
        match self {
            Op::Recommend { user_id, .. } | Op::Score { user_id, .. } => *user_id,
        }
    }

    /// The request's context, when it gave one.
    pub fn context(&self) -> Option<&[f32]> {
        match self {
            Op::Recommend { context, .. } | Op::Score { context, .. } => context.as_deref(),
        }
    }

    pub fn kind(&self) -> OpKind {
        match self {
            Op::Recommend { .. } => OpKind::Recommend,
            Op::Score { .. } => OpKind::Score,
        }
    }
}

pub use super::attributes::RowFilter;

/// One request row group of a batch: a user (history and features) and what to
/// compute for them.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    /// Item-table rows of the user's recent history (already cut to the
    /// model's `history_len`), oldest first. Pooled with a plain mean.
    pub history: &'a [u32],
    /// Dense user features, `user_feature_dim` long; `None` means zeros.
    pub features: Option<&'a [f32]>,
    /// Categorical user features, `user_sparse_dim` long; `None` means zeros.
    pub sparse: Option<&'a [i64]>,
    /// The request's context, `context_dim` long; `None` means zeros.
    pub context: Option<&'a [f32]>,
    pub task: Task<'a>,
}

#[derive(Debug, Clone)]
pub enum Task<'a> {
    /// Top `k` live items by score, skipping `exclude` (sorted rows) and
    /// the rows `filter` (when given) does not allow.
    TopK {
        k: usize,
        exclude: &'a [u32],
        filter: Option<&'a RowFilter>,
    },
    /// One score per given row, in order.
    Score { rows: &'a [u32] },
}

impl Query<'_> {
    /// Whether this is a recommend with an attribute filter.
    pub fn is_filtered(&self) -> bool {
        matches!(
            self.task,
            Task::TopK {
                filter: Some(_),
                ..
            }
        )
    }
}
