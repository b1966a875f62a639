//! The Kafka ingestion benchmark driver (see `rankd_tools::ingest_bench`).

fn main() -> anyhow::Result<()> {
    rankd_tools::ingest_bench::main()
}
