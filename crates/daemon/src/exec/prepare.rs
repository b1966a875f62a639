//! Preparing a batch: each request's inputs resolved against the item
//! table and the user store (the history rows the tower pools, the rows a
//! recommend excludes or a score request scores, a recommend's filter), the
//! backend's queries built from them, and their keys in the query cache. A
//! request that cannot be prepared (an unknown candidate id, a filter on an
//! attribute the catalogue lacks) is answered with its error and leaves the
//! batch.

use super::query_cache::Key;
use super::InferRequest;
use crate::backend::{Query, Task};
use crate::error::ServeError;
use crate::features::UserStore;
use crate::model::query::RowFilter;
use crate::model::{ItemTable, ModelSpec, Op};

/// Per-request inputs resolved against the item table and the user store.
pub(super) struct Prepared {
    /// History rows used for pooling (the newest `history_len`).
    history: Vec<u32>,
    /// Sorted excluded rows (recommend) or candidate rows (score).
    rows: Vec<u32>,
    /// A recommend's filter, resolved against the catalogue's attributes.
    filter: Option<RowFilter>,
}

/// Prepares `batch` for a model of `spec` reading `items` (catalogue
/// `catalogue`): the requests that can run, each with its inputs.
pub(super) fn batch(
    batch: Vec<InferRequest>,
    spec: &ModelSpec,
    items: &ItemTable,
    catalogue: &str,
    users: &UserStore,
) -> (Vec<InferRequest>, Vec<Prepared>) {
    let mut live = Vec::with_capacity(batch.len());
    let mut prepared = Vec::with_capacity(batch.len());
    for req in batch {
        match prepare(&req.op, spec, items, catalogue, users) {
            Ok(p) => {
                prepared.push(p);
                live.push(req);
            }
            Err(e) => {
                let _ = req.reply.send(Err(e));
            }
        }
    }
    (live, prepared)
}

/// The backend's queries for the prepared requests `live`.
pub(super) fn queries<'a>(
    live: &'a [InferRequest],
    prepared: &'a [Prepared],
    spec: &ModelSpec,
    users: &'a UserStore,
) -> Vec<Query<'a>> {
    prepared
        .iter()
        .zip(live)
        .map(|(p, req)| {
            let user = users.get(req.op.user_id());
            Query {
                history: &p.history,
                features: user
                    .and_then(|u| u.features.as_deref())
                    .filter(|f| f.len() == spec.user_feature_dim),
                sparse: user
                    .and_then(|u| u.sparse.as_deref())
                    .filter(|s| s.len() == spec.user_sparse_dim),
                context: req.op.context(),
                task: match &req.op {
                    Op::Recommend { k, .. } => Task::TopK {
                        k: *k,
                        exclude: &p.rows,
                        filter: p.filter.as_ref(),
                    },
                    Op::Score { .. } => Task::Score { rows: &p.rows },
                },
            }
        })
        .collect()
}

/// The query cache's key for each request of `live`: `None` for one whose
/// query is computed every time, the tower reading a request context for
/// it, or its user having no state.
pub(super) fn cache_keys(live: &[InferRequest], users: &UserStore) -> Vec<Option<Key>> {
    live.iter()
        .map(|req| {
            let user = req.op.user_id();
            if req.op.context().is_some_and(|c| !c.is_empty()) {
                return None;
            }
            users
                .changed_at(user)
                .map(|changed_at| Key { user, changed_at })
        })
        .collect()
}

fn prepare(
    op: &Op,
    spec: &ModelSpec,
    items: &ItemTable,
    catalogue: &str,
    users: &UserStore,
) -> Result<Prepared, ServeError> {
    let user_id = match op {
        Op::Recommend { user_id, .. } | Op::Score { user_id, .. } => *user_id,
    };
    let full_history = users.get(user_id).map(|u| &u.history);
    let history: Vec<u32> = full_history
        .map(|h| {
            h.iter()
                .skip(h.len().saturating_sub(spec.history_len))
                .filter_map(|&id| items.row_of(id))
                .collect()
        })
        .unwrap_or_default();
    let rows = match op {
        Op::Recommend { exclude, .. } => {
            let mut rows: Vec<u32> = full_history
                .into_iter()
                .flatten()
                .chain(exclude)
                .filter_map(|&id| items.row_of(id))
                .collect();
            rows.sort_unstable();
            rows.dedup();
            rows
        }
        Op::Score { items: ids, .. } => ids
            .iter()
            .map(|&id| {
                items
                    .live_row_of(id)
                    .ok_or_else(|| ServeError::Invalid(format!("unknown item id {id} in items")))
            })
            .collect::<Result<_, _>>()?,
    };
    let filter = match op {
        Op::Recommend {
            filter: Some(f), ..
        } => Some(
            RowFilter::resolve(f, items.attributes(), catalogue).map_err(ServeError::Invalid)?,
        ),
        _ => None,
    };
    Ok(Prepared {
        history,
        rows,
        filter,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::oneshot;

    use super::*;
    use crate::backend::ModelId;
    use crate::exec::{ModelIndex, Resident};
    use crate::features::store::{State, UserUpdate};
    use crate::features::UserDims;

    fn spec() -> ModelSpec {
        ModelSpec::parse(
            "kind = \"two_tower\"\ndim = 2\nhistory_len = 2\nitems = \"i.safetensors\"\n",
        )
        .unwrap()
    }

    fn request(
        op: Op,
    ) -> (
        InferRequest,
        oneshot::Receiver<Result<super::super::Answer, ServeError>>,
    ) {
        let resident = Arc::new(Resident {
            id: ModelId::new(0),
            model: ModelIndex::new(0),
            version: 1,
            spec: Arc::new(spec()),
            cpu_reason: None,
            engine: None,
            catalogue: "videos".into(),
        });
        InferRequest::for_test(resident, op)
    }

    #[test]
    fn requests_are_resolved_to_rows_and_one_that_cannot_be_leaves_the_batch() {
        let mut s = State::new(10);
        let ids: Vec<u64> = (10..20).collect();
        let videos = s.add_table("videos", ItemTable::new(2, ids, vec![0.5; 20]).unwrap());
        let update = UserUpdate {
            user_id: 7,
            history: Some(vec![15, 12, 11]),
            features: None,
            sparse: None,
        };
        s.upsert_user(update, &UserDims::default()).unwrap();
        let recommend = Op::Recommend {
            user_id: 7,
            k: 3,
            exclude: vec![19, 15, 404],
            filter: None,
            online: false,
            context: None,
        };
        let score = |items: Vec<u64>| Op::Score {
            user_id: 7,
            items,
            context: None,
        };
        let (a, _) = request(recommend);
        let (b, mut refused) = request(score(vec![13, 404]));
        let (c, _) = request(score(vec![18, 10]));
        let (spec, items) = (spec(), &s.tables[videos]);
        let (live, prepared) = batch(vec![a, b, c], &spec, items, "videos", &s.users);
        assert_eq!(live.len(), 2);
        let e = refused.try_recv().unwrap().unwrap_err();
        assert_eq!(e.to_string(), "unknown item id 404 in items");
        // The newest history_len ids pool; a recommend leaves out the whole
        // history and its exclusions (unknown ids dropped), as sorted rows.
        assert_eq!(prepared[0].history, [2, 1]);
        assert_eq!(prepared[0].rows, [1, 2, 5, 9]);
        // A score request's candidates, in the order given.
        assert_eq!(prepared[1].rows, [8, 0]);
        let queries = queries(&live, &prepared, &spec, &s.users);
        assert!(matches!(queries[0].task, Task::TopK { k: 3, .. }));
        assert!(matches!(queries[1].task, Task::Score { rows } if rows == [8, 0]));
        // Both may come from the query cache: the user has state and asked
        // without a context; an unknown user, or a context, may not.
        let changed_at = s.users.changed_at(7).unwrap();
        let kept = Some(Key {
            user: 7,
            changed_at,
        });
        assert_eq!(cache_keys(&live, &s.users), [kept, kept]);
        let (unknown, _) = request(Op::Score {
            user_id: 8,
            items: vec![10],
            context: None,
        });
        let with_context = Op::Score {
            user_id: 7,
            items: vec![10],
            context: Some(vec![1.0]),
        };
        let (context, _) = request(with_context);
        assert_eq!(cache_keys(&[unknown, context], &s.users), [None, None]);
    }
}
