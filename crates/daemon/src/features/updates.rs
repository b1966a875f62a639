//! Feature updates: decoding and validating the JSON messages of the events,
//! items and users topics (also used by the HTTP and socket update calls), and
//! coalescing them into update batches the executor applies in one step.
//!
//! Coalescing keeps what sequential application would leave behind: events are
//! appended in offset order; for an item or a user's features only the update
//! with the highest version survives (the earlier one on a tie), because an
//! update whose version is not newer than the stored one is ignored anyway.
//! (User updates that set different kinds of features, dense or categorical,
//! are all kept, in order: neither replaces what the other sets.)

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::catalogues::{Catalogues, Unresolved};
use super::users::SharedUserDims;
use crate::model::attributes::unknown_attribute;

/// Which stream a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Events,
    Items,
    Users,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Events => "events",
            Stream::Items => "items",
            Stream::Users => "users",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The user engaged with the item: append it to their history.
    Event { user_id: u64, item_id: u64 },
    /// Write an item's embedding in a catalogue (a new id grows its table).
    ItemUpsert {
        catalogue: String,
        item_id: u64,
        embedding: Vec<f32>,
        version: u64,
        /// Attribute values to set (names the catalogue has); others keep
        /// theirs (0 for a new item).
        attributes: BTreeMap<String, i64>,
    },
    /// Set an existing item's attributes, keeping its embedding (HTTP and
    /// the socket only: a Kafka item message carries the whole item).
    ItemAttributes {
        catalogue: String,
        item_id: u64,
        version: u64,
        attributes: BTreeMap<String, i64>,
    },
    /// Remove an item of a catalogue from results.
    ItemDelete {
        catalogue: String,
        item_id: u64,
        version: u64,
    },
    /// Set a user's dense features, categorical features, or both (at
    /// least one is given; the other is kept).
    UserFeatures {
        user_id: u64,
        features: Option<Vec<f32>>,
        sparse: Option<Vec<i64>>,
        version: u64,
    },
}

/// What decoding a message can end in besides an update.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// Valid, but not something rankd acts on (an event type not counted).
    Ignored(&'static str),
    /// Invalid: counted by reason, dead-lettered, skipped.
    Invalid {
        reason: &'static str,
        detail: String,
    },
}

/// What messages are checked against: the resident catalogues (an item
/// message names one, or there is only one) and the user feature widths the
/// resident versions read.
#[derive(Debug, Clone)]
pub struct Validator {
    pub catalogues: Catalogues,
    pub users: SharedUserDims,
    /// Event types that append to the history; others are ignored.
    pub event_types: Vec<String>,
}

#[derive(Deserialize)]
struct EventMsg {
    user_id: u64,
    item_id: u64,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    #[allow(dead_code)]
    ts_ms: Option<u64>,
}

#[derive(Deserialize)]
struct ItemMsg {
    #[serde(default)]
    catalogue: Option<String>,
    item_id: u64,
    #[serde(default)]
    embedding: Option<Vec<f64>>,
    #[serde(default)]
    deleted: bool,
    version: u64,
    #[serde(default)]
    attributes: Option<BTreeMap<String, i64>>,
}

#[derive(Deserialize)]
struct UserMsg {
    user_id: u64,
    #[serde(default)]
    features: Option<Vec<f64>>,
    #[serde(default)]
    sparse: Option<Vec<i64>>,
    version: u64,
}

fn invalid(reason: &'static str, detail: impl Into<String>) -> Rejection {
    Rejection::Invalid {
        reason,
        detail: detail.into(),
    }
}

fn parse<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, Rejection> {
    serde_json::from_slice(payload).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => invalid("wrong_type", e.to_string()),
        _ => invalid("bad_json", e.to_string()),
    })
}

/// JSON numbers (read as f64) to f32; the error names the first element that
/// is not a finite f32, with the value as sent.
pub fn finite_f32(values: &[f64], field: &str) -> Result<Vec<f32>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let f = v as f32;
            if f.is_finite() {
                Ok(f)
            } else {
                Err(format!(
                    "{field}[{i}] must be a finite 32-bit float (|x| <= {:e}), got {v:e}",
                    f32::MAX
                ))
            }
        })
        .collect()
}

/// A vector field of an update message: the expected length, finite f32 values.
pub fn finite_vector(values: &[f64], expected: usize, field: &str) -> Result<Vec<f32>, Rejection> {
    if values.len() != expected {
        return Err(invalid(
            "wrong_length",
            format!("{field} must have {expected} values, got {}", values.len()),
        ));
    }
    finite_f32(values, field).map_err(|detail| invalid("non_finite", detail))
}

impl Validator {
    pub fn decode(&self, stream: Stream, payload: &[u8]) -> Result<Update, Rejection> {
        match stream {
            Stream::Events => {
                let m: EventMsg = parse(payload)?;
                if !self.event_types.contains(&m.kind) {
                    return Err(Rejection::Ignored("event_type"));
                }
                Ok(Update::Event {
                    user_id: m.user_id,
                    item_id: m.item_id,
                })
            }
            Stream::Items => {
                let m: ItemMsg = parse(payload)?;
                let (catalogue, shape) =
                    self.catalogues
                        .resolve(m.catalogue.as_deref())
                        .map_err(|e| match e {
                            Unresolved::Unknown(m) => invalid("unknown_catalogue", m),
                            Unresolved::Ambiguous(m) => invalid("catalogue_required", m),
                        })?;
                if let Some(attributes) = &m.attributes {
                    if m.deleted {
                        return Err(invalid(
                            "conflicting_fields",
                            "an item message with `deleted: true` carries no `attributes`",
                        ));
                    }
                    if let Some(name) = attributes.keys().find(|n| !shape.attributes.contains(n)) {
                        return Err(invalid(
                            "unknown_attribute",
                            unknown_attribute(name, &catalogue, &shape.attributes),
                        ));
                    }
                }
                match (m.deleted, m.embedding) {
                    (true, _) => Ok(Update::ItemDelete {
                        catalogue,
                        item_id: m.item_id,
                        version: m.version,
                    }),
                    (false, Some(e)) => Ok(Update::ItemUpsert {
                        catalogue,
                        item_id: m.item_id,
                        embedding: finite_vector(&e, shape.dim, "embedding")?,
                        version: m.version,
                        attributes: m.attributes.unwrap_or_default(),
                    }),
                    (false, None) => Err(invalid(
                        "missing_field",
                        "an item message needs `embedding` or `deleted: true`",
                    )),
                }
            }
            Stream::Users => {
                let m: UserMsg = parse(payload)?;
                if m.features.is_none() && m.sparse.is_none() {
                    return Err(invalid(
                        "missing_field",
                        "a user message needs `features`, `sparse` or both",
                    ));
                }
                let dims = self.users.read();
                let features = match &m.features {
                    Some(f) if !dims.features.contains(&f.len()) => {
                        let expected: Vec<String> =
                            dims.features.iter().map(usize::to_string).collect();
                        return Err(invalid(
                            "wrong_length",
                            format!(
                                "features must have {} values, got {}",
                                expected.join(" or "),
                                f.len()
                            ),
                        ));
                    }
                    Some(f) => {
                        Some(finite_f32(f, "features").map_err(|d| invalid("non_finite", d))?)
                    }
                    None => None,
                };
                if let Some(sparse) = &m.sparse {
                    dims.check_sparse(sparse.len())
                        .map_err(|d| invalid("wrong_length", d))?;
                }
                Ok(Update::UserFeatures {
                    user_id: m.user_id,
                    features,
                    sparse: m.sparse,
                    version: m.version,
                })
            }
        }
    }
}

/// A source position: the next offset to read of one topic-partition.
pub type Position = (String, i32);

/// Updates gathered for one apply, with the source positions they cover.
#[derive(Debug, Clone, Default)]
pub struct UpdateBatch {
    /// (user, item) in source order.
    pub events: Vec<(u64, u64)>,
    /// Per item, the surviving upsert or delete.
    pub items: Vec<Update>,
    /// Per user, the surviving features.
    pub users: Vec<Update>,
    /// Next offset per topic-partition once this batch is applied.
    pub positions: BTreeMap<Position, i64>,
    /// Source timestamps (ms since the epoch) of the messages, for freshness.
    pub timestamps_ms: Vec<i64>,
    /// Messages that went into the batch, valid or not.
    pub messages: usize,
    /// Updates dropped while coalescing because another one for the same key
    /// had a version at least as new (what sequential application would ignore).
    pub superseded: usize,
}

impl UpdateBatch {
    pub fn updates(&self) -> usize {
        self.events.len() + self.items.len() + self.users.len()
    }
}

#[derive(Debug, Default)]
pub struct Coalescer {
    batch: UpdateBatch,
    items: HashMap<(String, u64), usize>,
    users: HashMap<u64, usize>,
}

fn version_of(u: &Update) -> u64 {
    match u {
        Update::ItemUpsert { version, .. }
        | Update::ItemAttributes { version, .. }
        | Update::ItemDelete { version, .. }
        | Update::UserFeatures { version, .. } => *version,
        Update::Event { .. } => 0,
    }
}

impl Coalescer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages gathered so far (valid or not).
    pub fn len(&self) -> usize {
        self.batch.messages
    }

    pub fn is_empty(&self) -> bool {
        self.batch.messages == 0
    }

    /// Records that a message at `offset` was consumed (whatever it held).
    pub fn consumed(&mut self, position: Option<(&str, i32, i64)>, timestamp_ms: Option<i64>) {
        self.batch.messages += 1;
        if let Some((topic, partition, offset)) = position {
            // A batch covers a handful of partitions: a scan finds the entry
            // without building a key String per message.
            let positions = &mut self.batch.positions;
            match positions
                .iter_mut()
                .find(|((t, p), _)| *p == partition && t == topic)
            {
                Some((_, next)) => *next = (*next).max(offset + 1),
                None => {
                    positions.insert((topic.to_string(), partition), offset + 1);
                }
            }
        }
        if let Some(ts) = timestamp_ms {
            self.batch.timestamps_ms.push(ts);
        }
    }

    pub fn push(&mut self, update: Update) {
        match update {
            Update::Event { user_id, item_id } => self.batch.events.push((user_id, item_id)),
            Update::ItemUpsert {
                ref catalogue,
                item_id,
                ..
            }
            | Update::ItemAttributes {
                ref catalogue,
                item_id,
                ..
            }
            | Update::ItemDelete {
                ref catalogue,
                item_id,
                ..
            } => {
                let key = (catalogue.clone(), item_id);
                let b = &mut self.batch;
                // Upserts that set attributes may set different ones: each
                // is kept, in order, so applying the batch does what
                // applying them one by one does (the version rule decides).
                let partial = |u: &Update| matches!(u, Update::ItemUpsert { attributes, .. } if !attributes.is_empty());
                let keep_both =
                    partial(&update) || self.items.get(&key).is_some_and(|&i| partial(&b.items[i]));
                if keep_both {
                    self.items.insert(key, b.items.len());
                    b.items.push(update);
                } else {
                    keep_newest(
                        &mut self.items,
                        &mut b.items,
                        &mut b.superseded,
                        key,
                        update,
                    )
                }
            }
            Update::UserFeatures { user_id, .. } => {
                let b = &mut self.batch;
                // One that sets other kinds of features than the one before
                // does not replace it: both are kept, in order.
                let kinds = |u: &Update| match u {
                    Update::UserFeatures {
                        features, sparse, ..
                    } => (features.is_some(), sparse.is_some()),
                    _ => (false, false),
                };
                let same_kinds = self
                    .users
                    .get(&user_id)
                    .is_none_or(|&i| kinds(&b.users[i]) == kinds(&update));
                if same_kinds {
                    keep_newest(
                        &mut self.users,
                        &mut b.users,
                        &mut b.superseded,
                        user_id,
                        update,
                    )
                } else {
                    self.users.insert(user_id, b.users.len());
                    b.users.push(update);
                }
            }
        }
    }

    pub fn take(&mut self) -> UpdateBatch {
        self.items.clear();
        self.users.clear();
        std::mem::take(&mut self.batch)
    }
}

/// Keeps, per key, the update sequential application would leave in place:
/// a later one replaces an earlier one only with a strictly newer version.
fn keep_newest<K: std::hash::Hash + Eq>(
    index: &mut HashMap<K, usize>,
    list: &mut Vec<Update>,
    superseded: &mut usize,
    key: K,
    u: Update,
) {
    match index.get(&key) {
        Some(&i) => {
            *superseded += 1;
            if version_of(&u) > version_of(&list[i]) {
                list[i] = u;
            }
        }
        None => {
            index.insert(key, list.len());
            list.push(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::catalogues::Shape;

    fn validator() -> Validator {
        let catalogues = Catalogues::new();
        catalogues.set(
            "videos",
            Some(Shape {
                dim: 2,
                attributes: vec!["in_stock".into()],
            }),
        );
        let users = SharedUserDims::default();
        users.set(crate::features::UserDims::of([(1, 0), (1, 3)]));
        Validator {
            catalogues,
            users,
            event_types: vec!["click".into()],
        }
    }

    #[test]
    fn decodes_each_stream_and_names_what_is_wrong() {
        let v = validator();
        assert_eq!(
            v.decode(
                Stream::Events,
                br#"{"user_id": 1, "item_id": 2, "type": "click", "ts_ms": 5}"#
            ),
            Ok(Update::Event {
                user_id: 1,
                item_id: 2
            })
        );
        assert_eq!(
            v.decode(
                Stream::Events,
                br#"{"user_id": 1, "item_id": 2, "type": "view"}"#
            ),
            Err(Rejection::Ignored("event_type"))
        );
        assert_eq!(
            v.decode(
                Stream::Items,
                br#"{"item_id": 3, "embedding": [1, 2.5], "version": 7}"#
            ),
            Ok(Update::ItemUpsert {
                catalogue: "videos".into(),
                item_id: 3,
                embedding: vec![1.0, 2.5],
                version: 7,
                attributes: Default::default(),
            })
        );
        assert_eq!(
            v.decode(
                Stream::Items,
                br#"{"item_id": 3, "deleted": true, "version": 8}"#
            ),
            Ok(Update::ItemDelete {
                catalogue: "videos".into(),
                item_id: 3,
                version: 8
            })
        );
        let reason = |r: Result<Update, Rejection>| match r {
            Err(Rejection::Invalid { reason, .. }) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert_eq!(reason(v.decode(Stream::Items, b"{not json")), "bad_json");
        assert_eq!(
            reason(v.decode(Stream::Items, br#"{"item_id": "x", "version": 1}"#)),
            "wrong_type"
        );
        assert_eq!(
            reason(v.decode(
                Stream::Items,
                br#"{"item_id": 1, "embedding": [1], "version": 1}"#
            )),
            "wrong_length"
        );
        assert_eq!(
            reason(v.decode(
                Stream::Items,
                br#"{"item_id": 1, "embedding": [1, 1e39], "version": 1}"#
            )),
            "non_finite"
        );
        assert_eq!(
            reason(v.decode(Stream::Items, br#"{"item_id": 1, "version": 1}"#)),
            "missing_field"
        );
        assert_eq!(
            reason(v.decode(
                Stream::Users,
                br#"{"user_id": -1, "features": [1], "version": 1}"#
            )),
            "wrong_type"
        );
    }

    /// A user message sets dense features, categorical features or both,
    /// each of a width a resident version reads; anything else is refused
    /// naming what is wrong.
    #[test]
    fn user_messages_carry_features_sparse_or_both() {
        let v = validator();
        let user = |features: Option<Vec<f32>>, sparse: Option<Vec<i64>>| {
            Ok(Update::UserFeatures {
                user_id: 4,
                features,
                sparse,
                version: 9,
            })
        };
        assert_eq!(
            v.decode(
                Stream::Users,
                br#"{"user_id": 4, "features": [0.5], "version": 9}"#
            ),
            user(Some(vec![0.5]), None)
        );
        assert_eq!(
            v.decode(
                Stream::Users,
                br#"{"user_id": 4, "sparse": [3, 0, 10], "version": 9}"#
            ),
            user(None, Some(vec![3, 0, 10]))
        );
        assert_eq!(
            v.decode(
                Stream::Users,
                br#"{"user_id": 4, "features": [2], "sparse": [1, 2, 3], "version": 9}"#
            ),
            user(Some(vec![2.0]), Some(vec![1, 2, 3]))
        );
        let refused = |payload: &[u8]| match v.decode(Stream::Users, payload) {
            Err(Rejection::Invalid { reason, detail }) => (reason, detail),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(br#"{"user_id": 4, "sparse": [1, 2], "version": 9}"#),
            (
                "wrong_length",
                "sparse must have 3 values (user_sparse_dim), got 2".to_string()
            )
        );
        assert_eq!(
            refused(br#"{"user_id": 4, "features": [1, 2], "sparse": [1, 2, 3], "version": 9}"#),
            (
                "wrong_length",
                "features must have 1 values, got 2".to_string()
            )
        );
        assert_eq!(
            refused(br#"{"user_id": 4, "sparse": [1.5, 2, 3], "version": 9}"#).0,
            "wrong_type"
        );
        assert_eq!(
            refused(br#"{"user_id": 4, "version": 9}"#).0,
            "missing_field"
        );
        // The widths read follow the resident versions.
        v.users.set(crate::features::UserDims::of([(1, 0)]));
        assert_eq!(
            refused(br#"{"user_id": 4, "sparse": [1, 2, 3], "version": 9}"#),
            (
                "wrong_length",
                "no loaded model reads sparse features (user_sparse_dim = 0), got 3 values"
                    .to_string()
            )
        );
    }

    /// User updates setting different kinds of features are all kept, in
    /// order; those setting the same kinds keep the newest version.
    #[test]
    fn user_updates_of_other_kinds_are_not_merged_away() {
        let mut c = Coalescer::new();
        let user = |version, dense: bool, sparse: bool| Update::UserFeatures {
            user_id: 2,
            features: dense.then(|| vec![version as f32]),
            sparse: sparse.then(|| vec![version as i64; 3]),
            version,
        };
        for u in [
            user(2, true, false),
            user(3, false, true),
            user(5, false, true),
            user(4, false, true),
        ] {
            c.consumed(None, None);
            c.push(u);
        }
        let b = c.take();
        assert_eq!(b.users, vec![user(2, true, false), user(5, false, true)]);
        assert_eq!(b.superseded, 2);
    }

    /// An item message goes to the catalogue it names, or to the only one;
    /// with several loaded, one that names none or an unknown one is refused
    /// naming the catalogues.
    #[test]
    fn item_messages_resolve_their_catalogue() {
        let v = validator();
        let upsert = |c: &str| Update::ItemUpsert {
            catalogue: c.into(),
            item_id: 3,
            embedding: vec![1.0, 2.0],
            version: 1,
            attributes: Default::default(),
        };
        let plain = br#"{"item_id": 3, "embedding": [1, 2], "version": 1}"#;
        assert_eq!(v.decode(Stream::Items, plain), Ok(upsert("videos")));
        v.catalogues.set(
            "creators",
            Some(Shape {
                dim: 3,
                attributes: Vec::new(),
            }),
        );
        let creators =
            br#"{"catalogue": "creators", "item_id": 3, "embedding": [1, 2, 3], "version": 1}"#;
        assert_eq!(
            v.decode(Stream::Items, creators),
            Ok(Update::ItemUpsert {
                catalogue: "creators".into(),
                item_id: 3,
                embedding: vec![1.0, 2.0, 3.0],
                version: 1,
                attributes: Default::default(),
            })
        );
        match v.decode(Stream::Items, plain) {
            Err(Rejection::Invalid { reason, detail }) => {
                assert_eq!(reason, "catalogue_required");
                assert!(detail.contains("creators, videos"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        match v.decode(
            Stream::Items,
            br#"{"catalogue": "music", "item_id": 3, "deleted": true, "version": 1}"#,
        ) {
            Err(Rejection::Invalid { reason, detail }) => {
                assert_eq!(reason, "unknown_catalogue");
                assert!(detail.contains("'music'"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // The dimension checked is the named catalogue's.
        match v.decode(
            Stream::Items,
            br#"{"catalogue": "creators", "item_id": 3, "embedding": [1, 2], "version": 1}"#,
        ) {
            Err(Rejection::Invalid { reason, detail }) => {
                assert_eq!(reason, "wrong_length");
                assert!(detail.contains("must have 3 values"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Upserts setting attributes are all kept, in order: one setting
    /// `category` then one setting `in_stock` leave both set, as applying
    /// them one by one does.
    #[test]
    fn upserts_with_attributes_are_not_merged_away() {
        let mut c = Coalescer::new();
        let upsert = |version, name: &str| Update::ItemUpsert {
            catalogue: "a".into(),
            item_id: 9,
            embedding: vec![1.0],
            version,
            attributes: [(name.to_string(), 1)].into(),
        };
        for u in [upsert(2, "category"), upsert(3, "in_stock")] {
            c.consumed(None, None);
            c.push(u);
        }
        let b = c.take();
        assert_eq!(b.items, vec![upsert(2, "category"), upsert(3, "in_stock")]);
        assert_eq!(b.superseded, 0);
    }

    /// The same item id in two catalogues is two keys: neither supersedes
    /// the other.
    #[test]
    fn coalescing_keeps_one_update_per_catalogue_and_item() {
        let mut c = Coalescer::new();
        for (catalogue, version) in [("a", 2), ("b", 1), ("a", 1)] {
            c.consumed(None, None);
            c.push(Update::ItemDelete {
                catalogue: catalogue.into(),
                item_id: 9,
                version,
            });
        }
        let b = c.take();
        assert_eq!(
            b.items,
            vec![
                Update::ItemDelete {
                    catalogue: "a".into(),
                    item_id: 9,
                    version: 2
                },
                Update::ItemDelete {
                    catalogue: "b".into(),
                    item_id: 9,
                    version: 1
                },
            ]
        );
        assert_eq!(b.superseded, 1);
    }

    #[test]
    fn coalescing_keeps_event_order_and_the_newest_version() {
        let mut c = Coalescer::new();
        for (i, u) in [
            Update::Event {
                user_id: 1,
                item_id: 10,
            },
            Update::ItemUpsert {
                catalogue: "videos".into(),
                item_id: 5,
                embedding: vec![1.0],
                version: 8,
                attributes: Default::default(),
            },
            Update::Event {
                user_id: 1,
                item_id: 11,
            },
            Update::ItemUpsert {
                catalogue: "videos".into(),
                item_id: 5,
                embedding: vec![2.0],
                version: 7,
                attributes: Default::default(),
            },
            Update::UserFeatures {
                user_id: 1,
                features: Some(vec![1.0]),
                sparse: None,
                version: 2,
            },
            Update::UserFeatures {
                user_id: 1,
                features: Some(vec![3.0]),
                sparse: None,
                version: 2,
            },
            Update::ItemDelete {
                catalogue: "videos".into(),
                item_id: 6,
                version: 1,
            },
        ]
        .into_iter()
        .enumerate()
        {
            c.consumed(Some(("t", 0, 100 + i as i64)), Some(1000 + i as i64));
            c.push(u);
        }
        c.consumed(Some(("t", 1, 4)), None);
        let b = c.take();
        assert!(c.is_empty());
        assert_eq!(b.events, vec![(1, 10), (1, 11)]);
        assert_eq!(
            b.items,
            vec![
                Update::ItemUpsert {
                    catalogue: "videos".into(),
                    item_id: 5,
                    embedding: vec![1.0],
                    version: 8,
                    attributes: Default::default(),
                },
                Update::ItemDelete {
                    catalogue: "videos".into(),
                    item_id: 6,
                    version: 1
                },
            ]
        );
        assert_eq!(
            b.users,
            vec![Update::UserFeatures {
                user_id: 1,
                features: Some(vec![1.0]),
                sparse: None,
                version: 2
            }],
            "on equal versions the first one stays, as sequential application would"
        );
        assert_eq!(b.superseded, 2);
        assert_eq!(b.positions[&("t".to_string(), 0)], 107);
        assert_eq!(b.positions[&("t".to_string(), 1)], 5);
        assert_eq!(b.messages, 8);
        assert_eq!(b.timestamps_ms.len(), 7);
    }
}
