//! rankd's tools, kept out of the daemon so it does not compile their
//! dependencies: the load generator behind `rankd bench` (`bench`), the GPU
//! check behind `rankd gpu-check` (`gpu_check`), and the Kafka ingestion
//! benchmark driver run by `benches/ingest.sh` (`ingest_bench`).

pub mod bench;
#[cfg(feature = "cuda")]
pub mod gpu_check;
#[cfg(feature = "kafka")]
pub mod ingest_bench;
