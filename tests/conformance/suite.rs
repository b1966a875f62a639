//! The conformance run of one model: the real `rankd` serving two versions
//! of it, users with empty, short and full histories, every answer compared
//! with the f64 reference through batches of 1, 2, 3, 4 and the model's largest
//! size, the bulk route and the socket; then an item deleted, an item
//! rewritten, and version 2 unloaded and loaded again by the admin API, with
//! the reference mutated the same way at each step.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rankd_client::types::{RecommendRequest, ScoreRequest};
use rankd_client::Client as _;
use serde_json::{json, Value};

use crate::common::parity::close;
use crate::common::*;
use crate::reference::{Reference, User};

const ADMIN: &str = "conformance-admin-token-0123456789";

/// Scores within 1e-6 of each other may come in either order.
const TIE: f64 = 1e-6;

/// Top k of every recommend.
const K: usize = 10;

/// One model under test: its files, model.toml, reference and users.
pub struct Setup {
    /// The model's name in the repository.
    pub name: String,
    /// model.toml of both versions.
    pub toml: String,
    /// Files copied into each version folder: (source, file name).
    pub files: Vec<(PathBuf, String)>,
    /// The model and its catalogue as the files hold them.
    pub reference: Reference,
    /// Users and what rankd is told of them.
    pub users: Vec<(u64, User)>,
    /// The item rewritten, and its new embedding (f32 values).
    pub write: (u64, Vec<f64>),
    /// The item deleted.
    pub delete: u64,
    /// `[batching] max_batch_size` of the model.toml.
    pub max_batch: usize,
}

/// Where the fixtures are: `RANKD_REPO` (a checkout the test binary was
/// copied beside, as on a GPU host), else the crate's own folder.
pub fn repo() -> PathBuf {
    std::env::var_os("RANKD_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(repo_root)
}

/// The daemon under test: `RANKD_BIN`, else the one cargo built.
pub fn rankd_bin() -> PathBuf {
    std::env::var_os("RANKD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rankd")))
}

/// `RANKD_EXPECT_GPU=1`: the daemon runs with `--device cuda:0`, and a
/// device that does not open fails the suite.
pub fn expect_gpu() -> bool {
    std::env::var("RANKD_EXPECT_GPU").is_ok_and(|v| v == "1")
}

/// What a request asks.
#[derive(Clone, Debug, PartialEq)]
enum Op {
    Recommend { k: usize, exclude: Vec<u64> },
    Score { items: Vec<u64> },
}

#[derive(Clone, Debug)]
struct Ask {
    user: u64,
    op: Op,
}

/// What rankd answered, whichever the transport.
#[derive(Clone, Debug)]
enum Got {
    Top(Vec<(u64, f64)>),
    Scores(Vec<f64>),
}

#[derive(Clone, Debug)]
struct Answer {
    got: Got,
    version: u64,
    /// `cold_start` or `degraded`: the popular items, not the model's.
    popular: bool,
    via: &'static str,
}

impl Ask {
    /// Batch rows it fills: a ranker's score fills one per candidate.
    fn rows(&self, ranker: bool) -> usize {
        match &self.op {
            Op::Score { items } if ranker => items.len(),
            _ => 1,
        }
    }

    fn body(&self) -> Value {
        match &self.op {
            Op::Recommend { k, exclude } => {
                json!({"user_id": self.user, "k": k, "exclude": exclude, "timeout_ms": 30000})
            }
            Op::Score { items } => {
                json!({"user_id": self.user, "items": items, "timeout_ms": 30000})
            }
        }
    }

    fn route(&self) -> &'static str {
        match self.op {
            Op::Recommend { .. } => "recommend",
            Op::Score { .. } => "score",
        }
    }
}

/// The user's state as the reference reads it.
fn user_of(users: &[(u64, User)], id: u64) -> &User {
    &users.iter().find(|(u, _)| *u == id).unwrap().1
}

/// The requests of one phase: for a retrieval model, per user a recommend
/// (every other one excluding the reference's best item and the last live
/// item) and a score of every live item (rotated per user); for a ranker,
/// per user a score of 1 to 8 live candidates, the rewritten item among them
/// for every third user.
fn asks(s: &Setup, r: &Reference) -> Vec<Ask> {
    let live = r.items.live_ids();
    let mut out = Vec::new();
    for (i, (u, user)) in s.users.iter().enumerate() {
        let rotated: Vec<u64> = live
            .iter()
            .cycle()
            .skip((7 * i) % live.len())
            .take(live.len())
            .copied()
            .collect();
        if r.retrieves() {
            let exclude = if i % 2 == 1 {
                vec![r.ranking(user, &[])[0].0, *live.last().unwrap()]
            } else {
                vec![]
            };
            out.push(Ask {
                user: *u,
                op: Op::Recommend { k: K, exclude },
            });
            out.push(Ask {
                user: *u,
                op: Op::Score { items: rotated },
            });
        } else {
            let n = [1, 3, 4, 4, 7, 8, 2, 5, 6][i % 9].min(s.max_batch);
            let mut items: Vec<u64> = Vec::with_capacity(n);
            if i % 3 == 0 && r.items.is_live(s.write.0) {
                items.push(s.write.0);
            }
            items.extend(rotated.iter().filter(|id| **id != s.write.0));
            items.truncate(n);
            out.push(Ask {
                user: *u,
                op: Op::Score { items },
            });
        }
    }
    out
}

async fn http_ask(c: &reqwest::Client, d: &Daemon, model: &str, ask: &Ask) -> Answer {
    let url = d.url(&format!("/v1/models/{model}/{}", ask.route()));
    let (status, body) = post(c, &url, ask.body()).await;
    assert_eq!(status, 200, "{model}: {ask:?}: {body}");
    answer_of(&body, "http")
}

fn answer_of(body: &Value, via: &'static str) -> Answer {
    let got = if let Some(items) = body["items"].as_array() {
        Got::Top(
            items
                .iter()
                .map(|i| (i["id"].as_u64().unwrap(), i["score"].as_f64().unwrap()))
                .collect(),
        )
    } else {
        Got::Scores(crate::common::parity::floats(&body["scores"]))
    };
    Answer {
        got,
        version: body["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("no version in {body}")),
        popular: body["cold_start"] == true || body["degraded"] == true,
        via,
    }
}

async fn uds_ask(uds: &rankd_client::UdsClient, model: &str, ask: &Ask) -> Answer {
    match &ask.op {
        Op::Recommend { k, exclude } => {
            let req = RecommendRequest {
                user_id: ask.user,
                k: *k,
                exclude: exclude.clone(),
                timeout_ms: Some(30_000),
                version: None,
                priority: None,
                filter: None,
                context: None,
            };
            let r = uds
                .recommend(model, req)
                .await
                .unwrap_or_else(|e| panic!("{model}: {ask:?} over the socket: {e}"));
            Answer {
                got: Got::Top(r.items.iter().map(|i| (i.id, i.score as f64)).collect()),
                version: r.version,
                popular: r.cold_start || r.degraded,
                via: "socket",
            }
        }
        Op::Score { items } => {
            let req = ScoreRequest {
                user_id: ask.user,
                items: items.clone(),
                timeout_ms: Some(30_000),
                version: None,
                priority: None,
                context: None,
            };
            let r = uds
                .score(model, req)
                .await
                .unwrap_or_else(|e| panic!("{model}: {ask:?} over the socket: {e}"));
            Answer {
                got: Got::Scores(r.scores.iter().map(|&s| s as f64).collect()),
                version: r.version,
                popular: false,
                via: "socket",
            }
        }
    }
}

/// One bulk call of `asks` over HTTP; the answers in input order.
async fn bulk(c: &reqwest::Client, d: &Daemon, model: &str, asks: &[&Ask]) -> Vec<Answer> {
    let body: String = asks
        .iter()
        .map(|a| {
            let mut line = a.body();
            line.as_object_mut().unwrap().remove("timeout_ms");
            line.to_string() + "\n"
        })
        .collect();
    let r = c
        .post(d.url(&format!("/v1/models/{model}/bulk")))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{model}: bulk call");
    let text = r.text().await.unwrap();
    let mut by_line: BTreeMap<u64, Answer> = BTreeMap::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(v["error"].is_null(), "{model}: bulk line failed: {v}");
        let line = v["line"].as_u64().unwrap_or_else(|| panic!("{v}"));
        by_line.insert(line, answer_of(&v, "bulk"));
    }
    assert_eq!(by_line.len(), asks.len(), "{model}: bulk answers: {text}");
    (1..=asks.len() as u64)
        .map(|l| by_line[&l].clone())
        .collect()
}

/// (batches, rows) executed for `model` so far.
async fn batches(c: &reqwest::Client, d: &Daemon, model: &str) -> (u64, u64) {
    let m = metrics(c, d).await;
    let count = sample(&m, &format!("rankd_batch_size_count{{model=\"{model}\"}}")).unwrap_or(0.0);
    let sum = sample(&m, &format!("rankd_batch_size_sum{{model=\"{model}\"}}")).unwrap_or(0.0);
    (count as u64, sum as u64)
}

/// Compares one answer with the reference; `what` names the case.
fn check(r: &Reference, users: &[(u64, User)], ask: &Ask, a: &Answer, version: u64, what: &str) {
    let user = user_of(users, ask.user);
    let what = format!(
        "{what}, user {} ({} history items), {} via {}",
        ask.user,
        user.history.len(),
        ask.route(),
        a.via
    );
    assert_eq!(a.version, version, "{what}: answered by the wrong version");
    assert!(
        !a.popular,
        "{what}: the popular items, not the model's answer"
    );
    match (&ask.op, &a.got) {
        (Op::Score { items }, Got::Scores(got)) => {
            let want = r.scores(user, items);
            assert_eq!(
                got.len(),
                want.len(),
                "{what}: {} scores for {} items",
                got.len(),
                items.len()
            );
            for ((id, g), w) in items.iter().zip(got).zip(&want) {
                assert!(close(*g, *w), "{what}: item {id}: rankd {g}, reference {w}");
            }
        }
        (Op::Recommend { k, exclude }, Got::Top(got)) => {
            let want = r.ranking(user, exclude);
            let score_of: HashMap<u64, f64> = want.iter().copied().collect();
            assert_eq!(
                got.len(),
                (*k).min(want.len()),
                "{what}: {} items; reference top: {:?}",
                got.len(),
                &want[..(*k).min(want.len())]
            );
            let distinct: BTreeSet<u64> = got.iter().map(|g| g.0).collect();
            assert_eq!(distinct.len(), got.len(), "{what}: an item twice: {got:?}");
            for (i, (&(g, gs), &(w, ws))) in got.iter().zip(&want).enumerate() {
                let Some(&rs) = score_of.get(&g) else {
                    panic!(
                        "{what}: rank {i}: item {g} may not be returned (in the history, excluded, \
                         deleted or unknown); reference top: {:?}",
                        &want[..(*k).min(want.len())]
                    );
                };
                assert!(
                    g == w || (rs - ws).abs() <= TIE,
                    "{what}: rank {i}: rankd {g} (reference score {rs}), reference {w} ({ws}); \
                     rankd {got:?}, reference {:?}",
                    &want[..(*k).min(want.len())]
                );
                assert!(
                    close(gs, rs),
                    "{what}: rank {i}, item {g}: rankd {gs}, reference {rs}"
                );
            }
        }
        (op, got) => panic!("{what}: {op:?} answered with {got:?}"),
    }
}

/// Two answers to the same request agree: scores within the tolerance, the
/// same ids but for swaps of ties.
fn same(before: &Answer, after: &Answer, r: &Reference, user: &User, ask: &Ask, what: &str) {
    match (&before.got, &after.got) {
        (Got::Scores(b), Got::Scores(a)) => {
            assert_eq!(a.len(), b.len(), "{what}");
            for (x, y) in b.iter().zip(a) {
                assert!(
                    close(*y, *x),
                    "{what}: user {}: {y} after, {x} before",
                    ask.user
                );
            }
        }
        (Got::Top(b), Got::Top(a)) => {
            let Op::Recommend { exclude, .. } = &ask.op else {
                unreachable!()
            };
            let score_of: HashMap<u64, f64> = r.ranking(user, exclude).into_iter().collect();
            assert_eq!(
                a.len(),
                b.len(),
                "{what}: user {}: {a:?} after, {b:?} before",
                ask.user
            );
            for (&(ai, as_), &(bi, bs)) in a.iter().zip(b) {
                assert!(
                    ai == bi || (score_of[&ai] - score_of[&bi]).abs() <= TIE,
                    "{what}: user {}: {a:?} after, {b:?} before",
                    ask.user
                );
                assert!(
                    close(as_, bs) || ai != bi,
                    "{what}: user {}: {a:?} after, {b:?} before",
                    ask.user
                );
            }
        }
        _ => panic!("{what}: {before:?} before, {after:?} after"),
    }
}

/// The driver: the daemon, its client and socket, and what was seen.
struct Run<'a> {
    s: &'a Setup,
    d: Daemon,
    c: reqwest::Client,
    ranker: bool,
    /// Batch sizes (rows) seen executed as one batch of a group sent
    /// together, and the (batches, rows) of every group.
    formed: BTreeSet<usize>,
    groups: Vec<(usize, u64, u64)>,
    answered: usize,
    phases: usize,
}

impl Run<'_> {
    /// Rows of the groups sent together: every power of two below the
    /// largest batch (the sizes a device warms and rounds up to), 3 (a size
    /// between them), and the largest.
    fn targets(max_batch: usize) -> Vec<usize> {
        let mut t: Vec<usize> = [1, 2, 3, 4]
            .into_iter()
            .filter(|&n| n < max_batch)
            .collect();
        t.push(max_batch);
        t
    }

    /// Sends the first requests of `order` not yet `taken` that fill
    /// `target` rows together over HTTP, and notes whether they ran as one
    /// batch. Returns their answers, by index in `all`.
    async fn group(
        &mut self,
        all: &[Ask],
        order: &[usize],
        taken: &mut [bool],
        target: usize,
        what: &str,
    ) -> Vec<(usize, Answer)> {
        let model = &self.s.name;
        let mut group = Vec::new();
        let mut rows = 0;
        for &i in order {
            let need = all[i].rows(self.ranker);
            if !taken[i] && rows + need <= target {
                taken[i] = true;
                group.push(i);
                rows += need;
            }
        }
        if group.is_empty() {
            return Vec::new();
        }
        let before = batches(&self.c, &self.d, model).await;
        let got = futures::future::join_all(
            group
                .iter()
                .map(|&i| http_ask(&self.c, &self.d, model, &all[i])),
        )
        .await;
        let after = batches(&self.c, &self.d, model).await;
        let (nb, nr) = (after.0 - before.0, after.1 - before.1);
        assert_eq!(
            nr, rows as u64,
            "{model}: {what}: rows executed for a group of {rows}"
        );
        if nb == 1 {
            self.formed.insert(rows);
        }
        self.groups.push((rows, nb, nr));
        group.into_iter().zip(got).collect()
    }

    /// Sends again, up to three times, each group size that has not yet run
    /// as one batch (its requests were split by the clock), checking the
    /// answers with `r`.
    async fn missing_sizes(&mut self, r: &Reference, version: u64, what: &str) {
        let all = asks(self.s, r);
        for target in Self::targets(self.s.max_batch) {
            for attempt in 0..3 {
                if self.formed.contains(&target) {
                    break;
                }
                let mut order: Vec<usize> = (0..all.len()).collect();
                order.rotate_left((3 * attempt) % all.len());
                let mut taken = vec![false; all.len()];
                for (i, a) in self.group(&all, &order, &mut taken, target, what).await {
                    check(
                        r,
                        &self.s.users,
                        &all[i],
                        &a,
                        version,
                        &format!("{}: {what}", self.s.name),
                    );
                }
            }
        }
    }

    /// Sends every request of a phase, as batches of 1, 2, 3, 4 and the largest
    /// size over HTTP, a few concurrent ones over the socket and the rest in
    /// one bulk call, and checks each answer with `r`. Returns the answers,
    /// by the request's index in [`asks`].
    async fn phase(&mut self, r: &Reference, version: u64, what: &str) -> Vec<Answer> {
        let model = &self.s.name;
        let all = asks(self.s, r);
        let n = all.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.rotate_left((5 * self.phases) % n);
        self.phases += 1;
        let mut answers: Vec<Option<Answer>> = vec![None; n];
        let mut taken = vec![false; n];
        // Groups sent together, each meant to be one batch of its rows.
        for target in Self::targets(self.s.max_batch) {
            for (i, a) in self.group(&all, &order, &mut taken, target, what).await {
                answers[i] = Some(a);
            }
        }
        // A few over the socket, at once (one connection, pipelined).
        let uds = rankd_client::UdsClient::connect(&self.d.uds).await.unwrap();
        let on_socket: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| !taken[i])
            .take(4)
            .collect();
        let got =
            futures::future::join_all(on_socket.iter().map(|&i| uds_ask(&uds, model, &all[i])))
                .await;
        for (&i, a) in on_socket.iter().zip(got) {
            taken[i] = true;
            answers[i] = Some(a);
        }
        // The rest in one bulk call.
        let rest: Vec<usize> = order.iter().copied().filter(|&i| !taken[i]).collect();
        if !rest.is_empty() {
            let got = bulk(
                &self.c,
                &self.d,
                model,
                &rest.iter().map(|&i| &all[i]).collect::<Vec<_>>(),
            )
            .await;
            for (&i, a) in rest.iter().zip(got) {
                answers[i] = Some(a);
            }
        }
        let answers: Vec<Answer> = answers.into_iter().map(Option::unwrap).collect();
        for (ask, a) in all.iter().zip(&answers) {
            check(
                r,
                &self.s.users,
                ask,
                a,
                version,
                &format!("{model}: {what}"),
            );
        }
        self.answered += n;
        answers
    }

    async fn admin(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .c
            .post(
                self.d
                    .url(&format!("/v1/admin/models/{}/{path}", self.s.name)),
            )
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn catalogue_of(&self, version: u64) -> Option<String> {
        let cats = get_json(&self.c, &self.d.url("/v1/catalogues")).await;
        let reader = format!("{}@{version}", self.s.name);
        cats["catalogues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["models"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| *m == reader.as_str())
            })
            .map(|c| c["name"].as_str().unwrap().to_string())
    }

    async fn write_item(&self, catalogue: &str, id: u64, body: Value) -> Value {
        let url = self.d.url(&format!(
            "/v1/catalogues/{}/items/{id}",
            catalogue.replace('%', "%25").replace('/', "%2F")
        ));
        let (s, body) = post(&self.c, &url, body).await;
        assert_eq!(s, 200, "{}: item write to {catalogue}: {body}", self.s.name);
        assert_eq!(body["applied"], true, "{body}");
        body
    }
}

/// Writes both versions of the model into a new repository.
fn repository(s: &Setup) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for v in [1, 2] {
        let dir = root.path().join(&s.name).join(v.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        for (from, name) in &s.files {
            std::fs::copy(from, dir.join(name))
                .unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        }
        std::fs::write(dir.join("model.toml"), &s.toml).unwrap();
    }
    root
}

/// Starts the daemon on the device the run asks for and checks it opened.
async fn start(s: &Setup, repo: &Path, tokens: &Path) -> Daemon {
    let device = if expect_gpu() { "cuda:0" } else { "cpu" };
    let d = Daemon::start_bin(
        &rankd_bin(),
        repo,
        &[
            "--repository-poll-ms",
            "0",
            "--admin-token-file",
            tokens.to_str().unwrap(),
            "--device",
            device,
        ],
    );
    let c = Daemon::client();
    let (status, body) = get(&c, &d.url("/readyz")).await;
    assert_eq!(status, 200, "{}: /readyz: {body}", s.name);
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        ready["device"],
        device,
        "{}: the daemon does not run on {device}{}: {body}",
        s.name,
        if expect_gpu() {
            " (RANKD_EXPECT_GPU=1)"
        } else {
            ""
        }
    );
    assert_eq!(ready["device_healthy"], true, "{}: {body}", s.name);
    let info = get_json(&c, &d.url(&format!("/v1/models/{}", s.name))).await;
    if info["device"] != device {
        // A kind without a forward pass on the device serves from the CPU,
        // and only such a kind.
        let why = info["device_reason"].as_str().unwrap_or_default();
        assert!(
            why.contains("has no forward pass for"),
            "{}: served on {} beside the {device} device: {info}",
            s.name,
            info["device"]
        );
        eprintln!(
            "{}: served on {} beside the {device} device: {why}",
            s.name, info["device"]
        );
    } else {
        eprintln!("{}: served on {device}", s.name);
    }
    d
}

/// The whole run of one model.
pub async fn run(s: Setup) {
    let started = Instant::now();
    let root = repository(&s);
    let tokens_dir = tempfile::tempdir().unwrap();
    let tokens = tokens_dir.path().join("admin.tokens");
    std::fs::write(&tokens, format!("{ADMIN}\n")).unwrap();
    let d = start(&s, root.path(), &tokens).await;
    let c = Daemon::client();
    let ranker = !s.reference.retrieves();
    let mut run = Run {
        s: &s,
        d,
        c,
        ranker,
        formed: BTreeSet::new(),
        groups: Vec::new(),
        answered: 0,
        phases: 0,
    };
    let name = s.name.clone();

    // At start the highest version serves, reading its own catalogue.
    let info = get_json(&run.c, &run.d.url(&format!("/v1/models/{name}"))).await;
    assert_eq!(info["traffic"], json!({"2": 100}), "{info}");
    let catalogue = run
        .catalogue_of(2)
        .await
        .expect("version 2 reads a catalogue");
    for (u, user) in &s.users {
        let mut body = json!({"history": user.history});
        if !user.features.is_empty() {
            body["features"] = json!(user.features);
        }
        let (st, b) = post(&run.c, &run.d.url(&format!("/v1/users/{u}")), body).await;
        assert_eq!(st, 200, "{name}: user {u}: {b}");
    }

    let original = s.reference.clone();
    let mut r = s.reference.clone();
    run.phase(&r, 2, "as loaded").await;

    // An item deleted: gone from every answer, refused in a score, still
    // read where a history holds it.
    run.write_item(&catalogue, s.delete, json!({"deleted": true}))
        .await;
    r.items.delete(s.delete);
    run.phase(&r, 2, &format!("item {} deleted", s.delete))
        .await;
    let (st, body) = post(
        &run.c,
        &run.d.url(&format!("/v1/models/{name}/score")),
        json!({"user_id": s.users[0].0, "items": [s.delete]}),
    )
    .await;
    assert_eq!(
        st, 422,
        "{name}: a score of deleted item {}: {body}",
        s.delete
    );

    // An item's embedding rewritten: it changes the scan, the scores and
    // every history that holds it.
    run.write_item(&catalogue, s.write.0, json!({"embedding": s.write.1}))
        .await;
    r.items.write(s.write.0, &s.write.1);
    let before = run
        .phase(&r, 2, &format!("item {} rewritten", s.write.0))
        .await;

    // Version 1 loaded beside it and given every user: its own catalogue,
    // as its files hold it, untouched by the writes to version 2's.
    let (st, body) = run.admin("load", json!({"version": 1})).await;
    assert_eq!(
        (st, &body["state"]),
        (200, &json!("ready")),
        "{name}: load 1: {body}"
    );
    let (st, body) = run.admin("traffic", json!({"split": {"1": 100}})).await;
    assert_eq!(st, 200, "{name}: split: {body}");
    run.phase(&original, 1, "version 1 beside the written version 2")
        .await;

    // Version 2 unloaded: its catalogue is freed; loaded again, it comes
    // back with the delete and the write, and answers as before.
    let (st, body) = run.admin("unload", json!({"version": 2})).await;
    assert_eq!(st, 200, "{name}: unload 2: {body}");
    let info = get_json(&run.c, &run.d.url(&format!("/v1/models/{name}"))).await;
    let v2 = info["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 2)
        .cloned();
    assert_eq!(
        v2.map(|v| v["state"].clone()),
        Some(json!("unloaded")),
        "{info}"
    );
    assert_eq!(
        run.catalogue_of(2).await,
        None,
        "{name}: version 2 unloaded"
    );
    let cats = get_json(&run.c, &run.d.url("/v1/catalogues")).await;
    assert!(
        !cats["catalogues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == catalogue.as_str()),
        "{name}: no version reads {catalogue}, yet it is resident: {cats}"
    );
    let (st, body) = run.admin("load", json!({"version": 2})).await;
    assert_eq!(
        (st, &body["state"]),
        (200, &json!("ready")),
        "{name}: load 2: {body}"
    );
    let (st, body) = run.admin("traffic", json!({"split": null})).await;
    assert_eq!(
        (st, &body["traffic"]),
        (200, &json!({"2": 100})),
        "{name}: {body}"
    );
    assert_eq!(
        run.catalogue_of(2).await.as_deref(),
        Some(catalogue.as_str())
    );
    let after = run
        .phase(&r, 2, "version 2 unloaded and loaded again")
        .await;
    let all = asks(&s, &r);
    for ((ask, b), a) in all.iter().zip(&before).zip(&after) {
        let user = user_of(&s.users, ask.user);
        same(
            b,
            a,
            &r,
            user,
            ask,
            &format!("{name}: after the reload vs before it"),
        );
    }

    // The batch sizes asked for were formed, each as one batch.
    run.missing_sizes(&r, 2, "groups sent again").await;
    eprintln!(
        "{name}: {} answers in {} phases; groups (rows, batches, rows executed): {:?}; {:.1} s",
        run.answered,
        run.phases,
        run.groups,
        started.elapsed().as_secs_f64()
    );
    for size in Run::targets(s.max_batch) {
        assert!(
            run.formed.contains(&size),
            "{name}: no group of {size} rows ran as one batch: {:?}",
            run.groups
        );
    }
}

/// A fixture's model.toml key (`key = value`), as the file writes it.
pub fn toml_value(path: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("{}: no {key}", path.display()))
}

/// The id most often in `lists` (ties: the smaller), leaving out `but`.
pub fn most_frequent<'a>(lists: impl Iterator<Item = &'a [u64]>, but: &[u64]) -> u64 {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for l in lists {
        for id in l {
            if !but.contains(id) {
                *counts.entry(*id).or_default() += 1;
            }
        }
    }
    counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(id, _)| *id)
        .expect("no ids")
}
