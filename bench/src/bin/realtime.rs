//! Realtime benchmark: one `quikapp realtime` gateway (the release binary, its own process)
//! beside the relay and the write API (their own processes too) on the real PostgreSQL, Kafka
//! and Redis; this process is the load generator, with tokio-tungstenite clients.
//!
//! 1. **Connections.** `--workspaces` workspaces, each with an owner (who posts, and is not
//!    connected) and a private channel of `--members` members; one connection per member
//!    (10,000 by default), all held at once. Memory per connection: the gateway's resident
//!    memory before and after, over the connections.
//! 2. **Latency.** `--rate` messages per second for `--seconds`, spread over the channels;
//!    from the command's acceptance by the write API (its answer) to each member's frame.
//! 3. **Fan-out.** Slices of synthetic events written straight into the gateway's Redis stream
//!    as fast as Redis takes them: the frames per second the gateway delivers to its clients,
//!    next to a raw Redis pub/sub baseline of the same fan-out (channels of `--members`
//!    subscribers, frames of the same size) in the same run.
//!
//! Run it with `bench/realtime` (release build, starts PostgreSQL, Kafka and Redis).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures::StreamExt;
use quikapp_bench::{PARTITIONS, fresh_topics, percentile, posted};
use quikapp_commands::store::contract;
use quikapp_realtime::fanout::{Item, Slice};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use uuid::Uuid;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

#[derive(Parser)]
struct Args {
    #[arg(long, env = "QUIKAPP_KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "QUIKAPP_REDIS_URL")]
    redis_url: String,
    /// The `quikapp` binary to run the roles with.
    #[arg(long, env = "QUIKAPP_BIN")]
    quikapp: String,
    /// Workspaces, each with one private channel.
    #[arg(long, default_value_t = 1_000)]
    workspaces: usize,
    /// Connected members per channel.
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Messages per second in the latency run.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Synthetic events in the fan-out run (each reaches `--members` clients).
    #[arg(long, default_value_t = 100_000)]
    fanout_events: u64,
}

/// A role of the binary, killed when dropped.
struct Role {
    child: Child,
    url: String,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &Args, env: &[(&str, String)], role: &str, what: &str) -> Result<Role> {
    let mut child = Command::new(&args.quikapp)
        .arg(role)
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} {role}", args.quikapp))?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let url = loop {
        let line = lines.next().context("the role ended before listening")??;
        if let Some(url) = line.strip_prefix(&format!("{what} listening on ")) {
            break url.to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(Role { child, url })
}

fn resident_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// A command through the write API; its answer.
async fn command(http: &reqwest::Client, write: &str, token: &str, path: &str, body: Value) -> Result<Value> {
    let response = http.post(format!("{write}/v1{path}")).bearer_auth(token).json(&body).send().await?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    ensure!(status.is_success(), "{path}: {status} {answer}");
    Ok(answer)
}

fn id(answer: &Value, name: &str) -> Uuid {
    answer[name].as_str().expect("an id").parse().expect("a uuid")
}

/// One workspace: its owner and channel, and the members of the channel.
struct Team {
    owner: Uuid,
    channel: Uuid,
    members: Vec<Uuid>,
}

async fn team(
    http: reqwest::Client,
    write: String,
    tokens: quikapp_write_api::auth::Tokens,
    members: usize,
) -> Result<Team> {
    let owner = Uuid::now_v7();
    let token = tokens.mint(owner);
    let workspace =
        id(&command(&http, &write, &token, "/workspaces", json!({ "name": "bench" })).await?, "workspace_id");
    let path = format!("/workspaces/{workspace}/channels");
    let channel =
        id(&command(&http, &write, &token, &path, json!({ "name": "room", "private": true })).await?, "channel_id");
    let members: Vec<Uuid> = (0..members).map(|_| Uuid::now_v7()).collect();
    for member in &members {
        let body = json!({ "user_id": member, "role": "member" });
        command(&http, &write, &token, &format!("/workspaces/{workspace}/members"), body).await?;
        command(&http, &write, &token, &format!("/channels/{channel}/members"), json!({ "user_id": member })).await?;
    }
    Ok(Team { owner, channel, members })
}

/// What every client reports: (message sequence number, when its frame came); and frames of
/// events counted.
#[derive(Default)]
struct Received {
    frames: Mutex<Vec<(usize, Instant)>>,
    synthetic: AtomicU64,
    presence: AtomicU64,
}

/// Holds a stream open, noting the bench's messages (their text is their sequence number).
async fn client(url: String, received: Arc<Received>, ready: tokio::sync::mpsc::Sender<()>) -> Result<()> {
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.context("connecting")?;
    let hello = socket.next().await.context("no hello")??;
    ensure!(hello.to_text()?.contains("\"hello\""), "not a hello: {hello}");
    let _ = ready.send(()).await;
    while let Some(message) = socket.next().await {
        let tokio_tungstenite::tungstenite::Message::Text(text) = message? else { continue };
        let at = Instant::now();
        let frame: Value = serde_json::from_str(&text)?;
        if frame["type"] == "presence" {
            received.presence.fetch_add(1, Ordering::Relaxed);
        }
        if frame["type"] != "event" || frame["event"]["type"] != "MessagePosted" {
            continue;
        }
        match frame["event"]["data"]["text"].as_str().and_then(|t| t.strip_prefix("seq ")) {
            Some(seq) => received.frames.lock().unwrap().push((seq.parse()?, at)),
            None => _ = received.synthetic.fetch_add(1, Ordering::Relaxed),
        }
    }
    let _ = socket.close(None).await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let postgres = contract::fresh_postgres_database().await.context("QUIKAPP_POSTGRES_URL")?;
    let topics = fresh_topics();
    let run = Uuid::now_v7().simple().to_string();
    let prefix = format!("bench:{run}:");
    let env: Vec<(&str, String)> = vec![
        ("QUIKAPP_POSTGRES_URL", postgres),
        ("QUIKAPP_KAFKA_BROKERS", args.kafka_brokers.clone()),
        ("QUIKAPP_REDIS_URL", args.redis_url.clone()),
        ("QUIKAPP_KAFKA_MESSAGES_TOPIC", topics.messages.clone()),
        ("QUIKAPP_KAFKA_WORKSPACES_TOPIC", topics.workspaces.clone()),
        ("QUIKAPP_KAFKA_PARTITIONS", PARTITIONS.to_string()),
        ("QUIKAPP_REALTIME_GROUP", format!("bench-{run}-realtime")),
        ("QUIKAPP_REDIS_KEY_PREFIX", prefix.clone()),
        ("QUIKAPP_JWT_SECRET", SECRET.into()),
        ("QUIKAPP_RATE_LIMIT_PER_SECOND", "1000000".into()),
        ("QUIKAPP_RATE_LIMIT_BURST", "1000000".into()),
        ("QUIKAPP_WRITE_ADDR", "127.0.0.1:0".into()),
        ("QUIKAPP_RELAY_ADDR", "127.0.0.1:0".into()),
        ("QUIKAPP_REALTIME_ADDR", "127.0.0.1:0".into()),
    ];
    let migrate = Command::new(&args.quikapp).arg("migrate").envs(env.iter().map(|(n, v)| (*n, v))).output()?;
    ensure!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let _relay = start(&args, &env, "relay", "relay")?;
    let write = start(&args, &env, "write-api", "write API")?;
    let gateway = start(&args, &env, "realtime", "realtime gateway")?;
    let http = reqwest::Client::new();
    let tokens = quikapp_write_api::auth::Tokens::new(SECRET)?;

    // ------------------------------------------------------------ 1. connections
    let started = Instant::now();
    let mut making = JoinSet::new();
    let mut teams = Vec::new();
    for _ in 0..args.workspaces {
        if making.len() >= 32 {
            teams.push(making.join_next().await.expect("one is running")??);
        }
        making.spawn(team(http.clone(), write.url.clone(), tokens.clone(), args.members));
    }
    while let Some(made) = making.join_next().await {
        teams.push(made??);
    }
    println!(
        "setup: {} workspaces and channels of {} members in {:.1} s",
        teams.len(),
        args.members,
        started.elapsed().as_secs_f64()
    );
    let ws = gateway.url.replace("http://", "ws://");
    while http.get(format!("{}/readyz", gateway.url)).send().await?.status() != 200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = resident_kb(gateway.child.id())?;
    let received = Arc::new(Received::default());
    let connections = teams.len() * args.members;
    let (ready_out, mut ready) = tokio::sync::mpsc::channel(connections);
    let mut clients = JoinSet::new();
    let started = Instant::now();
    for (i, member) in teams.iter().flat_map(|team| &team.members).enumerate() {
        let url = format!("{ws}/v1/stream?access_token={}", tokens.mint(*member));
        clients.spawn(client(url, received.clone(), ready_out.clone()));
        if i % 200 == 199 {
            for _ in 0..200 {
                ready.recv().await.context("a client failed to connect")?;
            }
        }
    }
    for _ in 0..connections % 200 {
        ready.recv().await.context("a client failed to connect")?;
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    // Each connection is announced online to the members of its workspace attached before the
    // announcement: of each pair of members, one hears of the other at least. Once that many
    // frames are in, the gateway's memory is measured.
    let announced = (teams.len() * args.members * (args.members - 1) / 2) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.presence.load(Ordering::Relaxed) < announced && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(received.presence.load(Ordering::Relaxed) >= announced, "presence frames missing");
    let after = resident_kb(gateway.child.id())?;
    let per_connection = (after.saturating_sub(before)) as f64 / connections as f64;
    println!(
        "connections: {connections} held on one gateway (opened in {connect_seconds:.1} s); gateway memory {} MB before, {} MB after: {per_connection:.1} kB per connection",
        before / 1024,
        after / 1024
    );

    // ------------------------------------------------------------ 2. latency
    let count = (args.rate * args.seconds) as usize;
    let accepted: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; count]));
    let mut posting = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    for seq in 0..count {
        tick.tick().await;
        let team = &teams[seq % teams.len()];
        let (http, write, token) = (http.clone(), write.url.clone(), tokens.mint(team.owner));
        let (path, accepted) = (format!("/channels/{}/messages", team.channel), accepted.clone());
        posting.spawn(async move {
            command(&http, &write, &token, &path, json!({ "text": format!("seq {seq}") })).await?;
            accepted.lock().unwrap()[seq] = Some(Instant::now());
            anyhow::Ok(())
        });
    }
    while let Some(done) = posting.join_next().await {
        done??;
    }
    let posting_seconds = started.elapsed().as_secs_f64();
    let expected = count * args.members;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.frames.lock().unwrap().len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let frames = std::mem::take(&mut *received.frames.lock().unwrap());
    ensure!(frames.len() == expected, "{} frames of {expected} arrived within a minute", frames.len());
    let accepted = accepted.lock().unwrap();
    let mut latencies: Vec<Duration> = frames
        .iter()
        .map(|(seq, at)| at.saturating_duration_since(accepted[*seq].expect("every command was accepted")))
        .collect();
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!(
        "latency: {count} messages at {:.0}/s over {} channels, {expected} frames: accepted to received p50 {p50:.2} ms, p99 {p99:.2} ms (target p99 < 50 ms)",
        count as f64 / posting_seconds,
        teams.len()
    );
    drop(accepted);
    // The gateway's own view: from each event's occurred_at (set by the write API) to its frame
    // written, as its /metrics summary has it.
    let metrics = http.get(format!("{}/metrics", gateway.url)).send().await?.text().await?;
    for line in metrics.lines().filter(|l| l.starts_with("quikapp_realtime_delivery_seconds{quantile")) {
        println!("  gateway: {line}");
    }

    // ------------------------------------------------------------ 3. fan-out
    // The gateway's stream is in the realtime database (QUIKAPP_REALTIME_REDIS_DB, 2 by default).
    let client = quikapp_realtime::fanout::redis_client(&args.redis_url, 2)?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    // Positions far above the store's: the gateway releases them at once, and the run's real
    // events (below them) no longer reach its clients afterwards: this comes last.
    let mut position = 1_000_000_000u64;
    let events_per_slice = 100u64;
    let slices = args.fanout_events.div_ceil(events_per_slice);
    let mut payloads = Vec::new();
    let mut sample = String::new();
    for s in 0..slices {
        let mut records = Vec::new();
        for e in 0..events_per_slice {
            position += 1;
            let team = &teams[((s * events_per_slice + e) as usize) % teams.len()];
            let event = posted(position, Uuid::now_v7(), team.channel, team.owner);
            if sample.is_empty() {
                sample = json!({ "type": "event", "event": &event }).to_string();
            }
            records.push(Item::Event { topic: topics.messages.clone(), partition: 0, event: Box::new(event) });
        }
        for topic in [&topics.messages, &topics.workspaces] {
            for partition in 0..PARTITIONS {
                records.push(Item::Watermark { topic: topic.clone(), partition, position });
            }
        }
        payloads.push(serde_json::to_vec(&Slice { records })?);
    }
    let fanout_frames = slices * events_per_slice * args.members as u64;
    let started = Instant::now();
    for chunk in payloads.chunks(50) {
        let mut pipe = redis::pipe();
        for payload in chunk {
            pipe.cmd("XADD").arg(format!("{prefix}realtime")).arg("*").arg("s").arg(payload).ignore();
        }
        let () = pipe.query_async(&mut redis).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.synthetic.load(Ordering::Relaxed) < fanout_frames && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = received.synthetic.load(Ordering::Relaxed);
    let gateway_rate = got as f64 / started.elapsed().as_secs_f64();
    ensure!(got == fanout_frames, "{got} of {fanout_frames} fan-out frames arrived");

    // Raw: Redis pub/sub, channels of `members` subscribers, the same frames.
    let raw_subscribers = 1_000usize;
    let raw_channels = raw_subscribers / args.members;
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subscribers = JoinSet::new();
    let (subscribed_out, mut subscribed) = tokio::sync::mpsc::channel(raw_subscribers);
    for i in 0..raw_subscribers {
        let (client, delivered, subscribed) = (client.clone(), delivered.clone(), subscribed_out.clone());
        let channel = format!("{prefix}raw:{}", i % raw_channels);
        subscribers.spawn(async move {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            let _ = subscribed.send(()).await;
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let _: Vec<u8> = message.get_payload()?;
                delivered.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    for _ in 0..raw_subscribers {
        subscribed.recv().await.context("a subscriber failed")?;
    }
    let raw_messages = fanout_frames / args.members as u64;
    let started = Instant::now();
    for chunk in (0..raw_messages).collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("PUBLISH").arg(format!("{prefix}raw:{}", *i as usize % raw_channels)).arg(&sample).ignore();
        }
        let () = pipe.query_async(&mut redis).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) < fanout_frames && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let raw_rate = delivered.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    subscribers.abort_all();
    println!(
        "fan-out: gateway {gateway_rate:.0} frames/s ({fanout_frames} frames of {} bytes to {connections} clients); raw Redis pub/sub {raw_rate:.0} frames/s ({raw_subscribers} subscribers, {} per channel): gateway/raw {:.2}x",
        sample.len(),
        args.members,
        gateway_rate / raw_rate
    );
    if received.frames.lock().unwrap().len() > 0 {
        bail!("frames of the latency run arrived during the fan-out run");
    }
    clients.abort_all();
    Ok(())
}
