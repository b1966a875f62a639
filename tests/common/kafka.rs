//! A real Kafka-protocol broker (tansu, sqlite storage) for tests: started on
//! a free port in a temporary folder, stopped when dropped. `scripts/test.sh`
//! installs tansu and exports its path in `RANKD_TANSU`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

pub fn tansu_binary() -> PathBuf {
    let path = std::env::var_os("RANKD_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/rankd/tools/tansu-0.6.0/bin/tansu")
        });
    assert!(
        path.is_file(),
        "the tansu broker is not installed at {} (scripts/test.sh installs it; or set RANKD_TANSU)",
        path.display()
    );
    path
}

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    _turn: super::daemon::Turn,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Self {
            child: None,
            port: free_port(),
            dir,
            _turn: super::daemon::shared(),
        };
        b.restart();
        b
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and the same sqlite file.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .unwrap();
        let child = Command::new(tansu_binary())
            .current_dir(self.dir.path())
            .args(["broker", "--storage-engine", "sqlite://tansu.db"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn create_topics(&self, names: &[&str], partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .unwrap();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
            .collect();
        let results = futures::executor::block_on(admin.create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .unwrap();
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
    }

    pub fn producer(&self) -> Producer_ {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .create()
            .unwrap();
        Producer_(p)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A synchronous producer for tests.
pub struct Producer_(pub BaseProducer);

impl Producer_ {
    pub fn send(&self, topic: &str, key: &str, payload: &str) {
        loop {
            match self.0.send(BaseRecord::to(topic).key(key).payload(payload)) {
                Ok(()) => break,
                Err((e, _)) => {
                    // Queue full: let deliveries drain.
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "produce failed: {e}"
                    );
                    self.0.poll(Duration::from_millis(10));
                }
            }
            self.0.poll(Duration::ZERO);
        }
    }

    pub fn flush(&self) {
        self.0
            .flush(Duration::from_secs(30))
            .expect("flushing the producer");
    }
}

/// Reads `want` messages of `topic` from the beginning: (rankd-reason header, payload).
pub fn consume_all(
    broker: &Broker,
    topic: &str,
    want: usize,
    within: Duration,
) -> Vec<(String, String)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "rankd-tests")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let reason = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "rankd-reason"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            out.push((
                reason,
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            ));
        }
    }
    out
}

/// Waits until `/v1/ingest` says `topic`'s partitions have applied `count`
/// messages in all.
pub async fn wait_applied(
    c: &reqwest::Client,
    d: &super::Daemon,
    topic: &str,
    count: i64,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let r = super::get_json(c, &d.url("/v1/ingest")).await;
        let applied: i64 = r["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["topic"] == topic)
            .map(|p| p["applied_offset"].as_i64().unwrap())
            .sum();
        if applied >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{topic}: {applied} of {count} applied after {within:?}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
