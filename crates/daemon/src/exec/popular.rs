//! Answers without the model: a recommend answered from the most popular
//! items, for a user the model knows nothing of (a cold start) or in place
//! of a request that would be shed (a degraded answer, where `batch::shed`
//! says so), and the 504 of a request dropped before it ran.

use super::{deadline_exceeded, Answer, InferRequest, Note};
use crate::backend::{Output, Scored, TableId};
use crate::batch::shed::{self, Shed};
use crate::batch::{DropReason, Dropped};
use crate::error::ServeError;
use crate::features::store::State;
use crate::features::UserStore;
use crate::metrics::Metrics;
use crate::model::query::RowFilter;
use crate::model::spec::{ColdStart, Degrade};
use crate::model::Op;

/// Answers the requests dropped as a batch of model `name` was taken, each
/// counted in `rankd_requests_dropped_total`: one whose deadline cannot be
/// met from the popular items through `degraded` where its model degrades
/// (`default`: `degrade` for the models whose model.toml does not set it),
/// else with the 504 now rather than at its deadline; a cancelled one not
/// at all.
pub(super) fn answer_dropped(
    dropped: Vec<Dropped<InferRequest>>,
    name: &str,
    default: Degrade,
    metrics: &Metrics,
    degraded: impl Fn(InferRequest),
) {
    for d in dropped {
        let req = d.request;
        metrics
            .dropped
            .with_label_values(&[name, d.reason.as_str(), req.class.as_str()])
            .inc();
        match d.reason {
            reason if shed::degrades_drop(reason, req.class, req.popular(default)) => {
                metrics
                    .degraded
                    .with_label_values(&[name, Shed::Deadline.as_str()])
                    .inc();
                degraded(req);
            }
            DropReason::Predicted | DropReason::Deadline => {
                let _ = req
                    .reply
                    .send(Err(deadline_exceeded(req.deadline - req.enqueued)));
            }
            DropReason::Cancelled => {}
        }
    }
}

/// A recommend for a user with no history and no features, of a model that
/// answers those from popularity.
pub(super) fn is_cold_start(req: &InferRequest, users: &UserStore) -> bool {
    let Op::Recommend { user_id, .. } = &req.op else {
        return false;
    };
    // Features count only where the model reads them (set for another
    // model, they say nothing to this one); so do categorical features
    // and the request's context.
    let spec = &req.resident.spec;
    let (fd, sd) = (spec.user_feature_dim, spec.user_sparse_dim);
    spec.cold_start == ColdStart::Popular
        && req.op.context().is_none()
        && users.get(*user_id).is_none_or(|u| {
            u.history.is_empty()
                && u.features.as_ref().is_none_or(|f| fd == 0 || f.len() != fd)
                && u.sparse.as_ref().is_none_or(|s| sd == 0 || s.len() != sd)
        })
}

/// Answers a recommend from table `table` of `state`: the items of `top`
/// (the most popular first) that the table holds live, then the catalogue
/// in table order with score 0, leaving out the user's history, `exclude`
/// and the rows the filter refuses.
pub(super) fn answer(
    req: InferRequest,
    note: Note,
    state: &State,
    table: Option<TableId>,
    top: &[(u64, f32)],
) {
    let Op::Recommend {
        user_id,
        k,
        exclude,
        filter,
        ..
    } = &req.op
    else {
        let _ = req.reply.send(Err(ServeError::Internal(
            "only a recommend has a popular answer: this is a bug".into(),
        )));
        return;
    };
    let Some(table) = table else {
        return req.not_resident();
    };
    let items = &state.tables[table];
    let attributes = items.attributes();
    let filter = match filter
        .as_ref()
        .map(|f| RowFilter::resolve(f, attributes, state.name_of(table)))
        .transpose()
    {
        Ok(f) => f,
        Err(m) => {
            let _ = req.reply.send(Err(ServeError::Invalid(m)));
            return;
        }
    };
    let allowed = |row: u32| {
        filter
            .as_ref()
            .is_none_or(|f| f.allows(attributes, row as usize))
    };
    let mut skip: std::collections::HashSet<u64> = exclude.iter().copied().collect();
    if let Some(u) = state.users.get(*user_id) {
        skip.extend(u.history.iter().copied());
    }
    let mut answer: Vec<Scored> = Vec::with_capacity(*k);
    for &(id, score) in top {
        if answer.len() == *k {
            break;
        }
        if items.live_row_of(id).is_some_and(allowed) && skip.insert(id) {
            answer.push(Scored { id, score });
        }
    }
    for row in 0..items.rows() as u32 {
        if answer.len() == *k {
            break;
        }
        let id = items.id(row);
        if items.is_live(row) && allowed(row) && skip.insert(id) {
            answer.push(Scored { id, score: 0.0 });
        }
    }
    let _ = req.reply.send(Ok(Answer {
        output: Output::TopK(answer),
        note,
        batch: None,
    }));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::oneshot;

    use super::*;
    use crate::backend::ModelId;
    use crate::exec::{ModelIndex, Resident, UserUpdate};
    use crate::features::store::ItemWrite;
    use crate::features::UserDims;
    use crate::model::{ItemTable, ModelSpec};

    type Answered = oneshot::Receiver<Result<Answer, ServeError>>;

    fn resident(extra: &str) -> Arc<Resident> {
        let spec = ModelSpec::parse(&format!(
            "kind = \"two_tower\"\ndim = 2\nhistory_len = 5\nitems = \"i.safetensors\"\n{extra}"
        ))
        .unwrap();
        Arc::new(Resident {
            id: ModelId::new(0),
            model: ModelIndex::new(0),
            version: 1,
            spec: Arc::new(spec),
            cpu_reason: None,
            engine: None,
            catalogue: "videos".into(),
        })
    }

    fn request(resident: Arc<Resident>, op: Op) -> (InferRequest, Answered) {
        InferRequest::for_test(resident, op)
    }

    fn recommend(user_id: u64, k: usize, exclude: Vec<u64>, context: Option<Vec<f32>>) -> Op {
        Op::Recommend {
            user_id,
            k,
            exclude,
            filter: None,
            online: false,
            context,
        }
    }

    /// The table `state()` adds.
    const VIDEOS: TableId = TableId::new(0);

    /// Items 1 to 6, and users that read them.
    fn state() -> State {
        let mut s = State::new(10);
        let ids: Vec<u64> = (1..=6).collect();
        s.add_table("videos", ItemTable::new(2, ids, vec![0.5; 12]).unwrap());
        s
    }

    fn user(s: &mut State, user_id: u64, history: &[u64], features: Option<Vec<f32>>) {
        let update = UserUpdate {
            user_id,
            history: Some(history.to_vec()),
            features,
            sparse: None,
        };
        s.upsert_user(update, &UserDims::of([(2, 0)])).unwrap();
    }

    #[test]
    fn popular_live_items_come_first_then_the_catalogue_without_history_or_exclusions() {
        let mut s = state();
        user(&mut s, 7, &[5], None);
        let delete: ItemWrite = serde_json::from_str(r#"{"item_id": 2}"#).unwrap();
        s.write_item_request(delete).unwrap();
        // 5 is in the user's history, 99 not in the catalogue, 1 excluded.
        let top = [(5, 9.0), (3, 4.0), (99, 3.0), (1, 2.0)];
        let (req, rx) = request(resident(""), recommend(7, 4, vec![1], None));
        answer(req, Note::Degraded, &s, Some(VIDEOS), &top);
        let a = rx.blocking_recv().unwrap().unwrap();
        assert_eq!(a.note, Note::Degraded);
        let Output::TopK(list) = a.output else {
            panic!("{:?}", a.output)
        };
        let got: Vec<(u64, f32)> = list.iter().map(|s| (s.id, s.score)).collect();
        // Then the catalogue in table order: 2 is deleted; fewer than k remain.
        assert_eq!(got, [(3, 4.0), (4, 0.0), (6, 0.0)]);
        // k bounds the answer.
        let (req, rx) = request(resident(""), recommend(8, 2, vec![], None));
        answer(req, Note::ColdStart, &s, Some(VIDEOS), &top);
        let Output::TopK(list) = rx.blocking_recv().unwrap().unwrap().output else {
            panic!()
        };
        assert_eq!(list.iter().map(|s| s.id).collect::<Vec<_>>(), [5, 3]);
    }

    #[test]
    fn a_cold_start_is_a_user_the_model_reads_nothing_of() {
        let mut s = state();
        user(&mut s, 1, &[3], None);
        user(&mut s, 2, &[], Some(vec![0.5, 0.5]));
        let reads_features = resident("user_feature_dim = 2\n");
        let cold = |r: &Arc<Resident>, op: Op| is_cold_start(&request(r.clone(), op).0, &s.users);
        assert!(
            cold(&resident(""), recommend(9, 3, vec![], None)),
            "unknown"
        );
        assert!(
            !cold(&resident(""), recommend(1, 3, vec![], None)),
            "a history"
        );
        assert!(!cold(&reads_features, recommend(2, 3, vec![], None)));
        assert!(
            cold(&resident(""), recommend(2, 3, vec![], None)),
            "features the model does not read"
        );
        let context = Some(vec![1.0]);
        assert!(
            !cold(&resident(""), recommend(9, 3, vec![], context)),
            "a context"
        );
        let by_model = resident("cold_start = \"model\"\n");
        assert!(!cold(&by_model, recommend(9, 3, vec![], None)));
        let score = Op::Score {
            user_id: 9,
            items: vec![1],
            context: None,
        };
        assert!(!cold(&resident(""), score), "only a recommend");
    }
}
