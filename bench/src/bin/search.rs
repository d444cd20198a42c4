//! Search benchmark against the real Kafka and OpenSearch, in one run so the ratios compare like
//! with like:
//!
//! 1. a backlog of `--events` MessagePosted events in 1,000 public channels of one workspace
//!    (after their ChannelCreated events), in fresh
//!    Kafka topics; each text is 8 words drawn from a 4,000-word vocabulary, common words far
//!    more often than rare ones;
//! 2. raw: `_bulk` of the same documents (external versions included) into an index made from
//!    the model's own template, one sender, batches of `--batch`;
//! 3. the search projector draining the backlog through the runtime (Kafka consumer group,
//!    batches, refresh waits, progress);
//! 4. searches of two words drawn like the texts', through the read API over HTTP with
//!    1, 4 and 8 concurrent clients (`--clients`; the caller may read all 1,000 channels), next
//!    to the same query sent to OpenSearch directly.
//!
//! Run it with `bench/search` (release build, starts the services).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use quikapp_bench::{backlog, channel_created, drain, fresh_topics, percentile, posted, read_api};
use quikapp_domain::Envelope;
use quikapp_projections::search::opensearch::{OpenSearch, query_body, source};
use quikapp_projections::search::{Known, Query, fold};
use serde_json::json;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "QUIKAPP_KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "QUIKAPP_ELASTICSEARCH_URL")]
    elasticsearch_url: String,
    /// Messages in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Records a projector applies per batch, at most, and documents per raw `_bulk`.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Searches per path.
    #[arg(long, default_value_t = 2_000)]
    requests: usize,
    /// Concurrent search clients: each count is measured in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    clients: Vec<usize>,
}

/// xorshift64*: the same texts and queries on every run, without a dependency.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A word of `vocabulary`, the first ones far more often (index ~ n·u³).
    fn word<'a>(&mut self, vocabulary: &'a [String]) -> &'a str {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        &vocabulary[((vocabulary.len() as f64) * u * u * u) as usize]
    }
}

fn vocabulary() -> Vec<String> {
    let syllables = ["ka", "lo", "mi", "ra", "tu", "ne", "so", "vi", "da", "pe", "zu", "ha", "bo", "ri", "ge", "fa"];
    let mut words = Vec::new();
    for a in syllables {
        for b in syllables {
            for c in syllables {
                words.push(format!("{a}{b}{c}"));
            }
        }
    }
    words
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let vocabulary = vocabulary();
    let mut random = Random(0x9E37_79B9_7F4A_7C15);
    let (reader, workspace) = (Uuid::now_v7(), Uuid::now_v7());
    let channels: Vec<Uuid> = (0..1_000).map(|_| Uuid::now_v7()).collect();
    let author = Uuid::now_v7();
    // The channels (public), then the messages.
    let created =
        channels.iter().enumerate().map(|(i, channel)| channel_created(i as u64 + 1, i, *channel, workspace, reader));
    let first = channels.len() as u64 + 1;
    let messages = (0..args.events).map(|i| {
        let mut event = posted(first + i, Uuid::now_v7(), channels[i as usize % channels.len()], author);
        let text = (0..8).map(|_| random.word(&vocabulary)).collect::<Vec<_>>().join(" ");
        if let quikapp_domain::Event::MessagePosted(posted) = &mut event.event {
            posted.text = text;
        }
        event.workspace_id = Some(workspace);
        event
    });
    let events: Vec<Envelope> = created.chain(messages).collect();
    let topics = fresh_topics();
    let started = Instant::now();
    let head = backlog(&args.kafka_brokers, &topics, events.iter().cloned()).await?;
    println!("search backlog: {head} events to Kafka in {:.1} s", started.elapsed().as_secs_f64());

    // Raw: the same documents, as the projector folds them, by `_bulk` into an index made from
    // the model's template.
    let prefix = format!("bench-{}-", Uuid::now_v7().simple());
    let model = Arc::new(OpenSearch::connect(&args.elasticsearch_url, &prefix)?);
    model.migrate().await?;
    let http = reqwest::Client::new();
    let base = args.elasticsearch_url.trim_end_matches('/');
    let raw_index = format!("{}-raw", model.messages());
    let created = http.put(format!("{base}/{raw_index}")).send().await?;
    anyhow::ensure!(created.status().is_success(), "create {raw_index}: {}", created.text().await?);
    let started = Instant::now();
    let public = Known { channels: channels.iter().map(|c| (*c, false)).collect(), ..Known::default() };
    for chunk in events[channels.len()..].chunks(args.batch) {
        let mut known = Known { channels: public.channels.clone(), ..Known::default() };
        let mut body = String::new();
        for id in fold(chunk, &mut known).changed {
            let document = &known.documents[&id];
            let action = json!({ "index": { "_id": id, "version": document.applied, "version_type": "external" } });
            body.push_str(&format!("{action}\n{}\n", source(document)));
        }
        let response = http
            .post(format!("{base}/{raw_index}/_bulk"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        let answer: serde_json::Value = response.json().await?;
        anyhow::ensure!(answer["errors"] == false, "raw bulk: {}", answer["items"][0]);
    }
    http.post(format!("{base}/{raw_index}/_refresh")).send().await?;
    let raw = args.events as f64 / started.elapsed().as_secs_f64();
    println!("OpenSearch raw: _bulk of the same documents               {raw:>9.0} events/s");
    let projected = drain(&args.kafka_brokers, args.batch, &topics, model.clone(), head).await?;
    println!("search projector: from Kafka, progress included          {projected:>9.0} records/s");
    println!("search projector / raw: {:.2}x (target >= 0.7)", projected / raw);
    drop(events);

    // Searches: through the read API, and the same query sent straight to OpenSearch.
    let timelines = Arc::new(quikapp_projections::timelines::memory::MemoryTimelines::new());
    let (address, token) = read_api(reader, workspace, &channels, timelines, model.clone()).await?;
    let queries: Vec<(String, String)> = (0..args.requests)
        .map(|_| (random.word(&vocabulary).to_owned(), random.word(&vocabulary).to_owned()))
        .collect();
    let measure = |name: &'static str, direct: bool, clients: usize| {
        let (http, token, queries) = (http.clone(), token.clone(), queries.clone());
        let alias = model.messages();
        async move {
            let clients = (0..clients).map(|c| {
                let (http, token, queries, alias) = (http.clone(), token.clone(), queries.clone(), alias.clone());
                async move {
                    let (mut latencies, mut hits) = (Vec::new(), 0u64);
                    for (one, two) in queries.iter().skip(c).step_by(clients) {
                        let started = Instant::now();
                        let total = if direct {
                            let words = vec![one.clone(), two.clone()];
                            let query = Query { workspace_id: workspace, words, limit: 20, ..Query::default() };
                            let response =
                                http.post(format!("{base}/{alias}/_search")).json(&query_body(&query)).send().await?;
                            let answer: serde_json::Value = response.json().await?;
                            answer["hits"]["total"]["value"].as_u64().context("a total")?
                        } else {
                            let url = format!("http://{address}/v1/workspaces/{workspace}/search?q={one}%20{two}");
                            let response = http.get(url).bearer_auth(&token).send().await?;
                            anyhow::ensure!(response.status().is_success(), "{}", response.status());
                            let answer: serde_json::Value = response.json().await?;
                            answer["total"].as_u64().context("a total")?
                        };
                        latencies.push(started.elapsed());
                        hits += total;
                    }
                    anyhow::Ok((latencies, hits))
                }
            });
            let results = futures::future::try_join_all(clients).await?;
            let hits: u64 = results.iter().map(|(_, hits)| hits).sum();
            let mut latencies: Vec<Duration> = results.into_iter().flat_map(|(l, _)| l).collect();
            latencies.sort_unstable();
            let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
            let mean_total = hits as f64 / latencies.len() as f64;
            println!("  {name:<34} p50 {p50:>7.2} ms   p99 {p99:>7.2} ms   (mean total {mean_total:.0} hits)");
            anyhow::Ok(p99)
        }
    };
    println!(
        "searches (2 words, the 1,000 channels of a workspace, limit 20) over {head} messages, {} requests per path:",
        args.requests
    );
    for clients in args.clients.iter().copied() {
        println!(" {clients} concurrent clients:");
        let direct = measure("OpenSearch _search, same query", true, clients).await?;
        let served = measure("GET /workspaces/{ws}/search", false, clients).await?;
        println!("  read API p99 / OpenSearch p99: {:.2}x (target: read API p99 < 50 ms)", served / direct);
    }
    let cleanup = http.delete(format!("{base}/{prefix}*")).send().await?;
    anyhow::ensure!(cleanup.status().is_success(), "delete the bench's indexes");
    Ok(())
}
