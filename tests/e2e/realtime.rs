//! The realtime gateway as an operator runs it: two `quikapp realtime` instances beside the
//! relay and the write API, separate processes on the real services; clients on WebSockets.
//! No fixed sleeps: a client proves it did not receive an event by receiving a later one (the
//! stream is in position order).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

use super::pipeline::{Client, Pipeline, id};
use super::support::{Running, deadline, quikapp, scratch_dir};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One client's stream.
struct Stream {
    socket: Socket,
    hello: Value,
}

impl Stream {
    /// Connects to `gateway` (its base URL) as the holder of `token`, resuming after `after`
    /// (by a first `resume` frame) when given; reads the hello.
    async fn connect(gateway: &str, token: &str, after: Option<u64>) -> Stream {
        let socket = match after {
            Some(after) => connect_resuming(gateway, token, after).await,
            None => {
                let url = format!("{}/v1/stream?access_token={token}", gateway.replace("http://", "ws://"));
                tokio_tungstenite::connect_async(url).await.expect("the gateway accepts").0
            }
        };
        let mut stream = Stream { socket, hello: Value::Null };
        stream.hello = stream.frame().await.expect("a hello");
        assert_eq!(stream.hello["type"], "hello", "{}", stream.hello);
        if let Some(after) = after {
            assert_eq!(stream.hello["position"], after.to_string(), "the stream starts after the resume");
        }
        stream
    }

    /// As [`Stream::connect`], on a socket whose receive buffer is a few kilobytes: a client
    /// that stops reading soon stops the gateway's writes to it.
    async fn connect_small(gateway: &str, token: &str) -> Stream {
        let url = format!("{}/v1/stream?access_token={token}", gateway.replace("http://", "ws://"));
        let address: std::net::SocketAddr = gateway.trim_start_matches("http://").parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4_096).unwrap();
        let tcp = socket.connect(address).await.unwrap();
        let plain = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
        let (socket, _) = tokio_tungstenite::client_async(url, plain).await.expect("the gateway accepts");
        let mut stream = Stream { socket, hello: Value::Null };
        stream.hello = stream.frame().await.expect("a hello");
        stream
    }

    /// The next frame (bounded, pings and pongs included); what ended the stream, if it ended.
    async fn frame(&mut self) -> Result<Value, String> {
        let next = async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).unwrap()),
                    Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
                    None => return Err("ended".into()),
                    Some(Err(error)) => return Err(error.to_string()),
                    Some(Ok(_)) => {}
                }
            }
        };
        deadline(Duration::from_secs(90), next).await.expect("a frame within 90 s")
    }

    /// The next frame of `kind` (`presence`, `typing`...), passing over the others.
    async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.frame().await.unwrap_or_else(|end| panic!("the stream stays open: {end}"));
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    async fn send(&mut self, frame: Value) {
        self.socket.send(Message::text(frame.to_string())).await.unwrap();
    }

    /// The events received up to and including the first that `last` accepts.
    async fn events_until(&mut self, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let frame = self.frame().await.unwrap_or_else(|end| panic!("the stream stays open: {end}"));
            if frame["type"] != "event" {
                continue;
            }
            let done = last(&frame["event"]);
            events.push(frame["event"].clone());
            if done {
                return events;
            }
        }
    }
}

fn message_id(event: &Value) -> Option<Uuid> {
    (event["type"] == "MessagePosted").then(|| event["data"]["message_id"].as_str().unwrap().parse().unwrap())
}

fn is_message(message: Uuid) -> impl Fn(&Value) -> bool {
    move |event| message_id(event) == Some(message)
}

/// Where the gateways run: two `quikapp realtime` instances beside the relay and the write
/// API on the real services, or `quikapp dev` on the embedded default (one instance, serving
/// as both).
#[derive(Clone, Copy)]
enum Setup {
    Services,
    Embedded,
}

/// `quikapp dev`'s environment on the embedded default, in a data directory of its own.
fn embedded() -> Vec<(&'static str, String)> {
    vec![
        ("QUIKAPP_DATA_DIR", scratch_dir().display().to_string()),
        ("QUIKAPP_WRITE_ADDR", "127.0.0.1:0".into()),
        ("QUIKAPP_READ_ADDR", "127.0.0.1:0".into()),
        ("QUIKAPP_REALTIME_ADDR", "127.0.0.1:0".into()),
        ("QUIKAPP_MIN_POSITION_WAIT_SECONDS", "60".into()),
        ("QUIKAPP_REQUEST_TIMEOUT_SECONDS", "90".into()),
        ("QUIKAPP_JWT_SECRET", super::pipeline::SECRET.into()),
        ("QUIKAPP_RATE_LIMIT_PER_SECOND", "100000".into()),
        ("QUIKAPP_RATE_LIMIT_BURST", "100000".into()),
    ]
}

/// `quikapp dev` with `env`, once it listens.
fn dev(env: &[(&'static str, String)]) -> Running {
    let mut command = quikapp(&["dev"]);
    command.envs(env.iter().map(|(n, v)| (*n, v.as_str())));
    Running::start_all(command, &["write API", "read API", "realtime gateway"])
}

/// The gateways, a workspace of three users (owner first), a public channel all three are in
/// and a private one of the owner and the second user.
struct World {
    env: Vec<(&'static str, String)>,
    client: Arc<Client>,
    users: [Uuid; 3],
    workspace: Uuid,
    public: Uuid,
    private: Uuid,
    /// The gateways' base URLs.
    gateways: Vec<String>,
    /// Their processes, when each has its own.
    gateway_processes: Vec<Running>,
    _processes: Vec<Running>,
}

impl World {
    async fn new(setup: Setup, env: &[(&'static str, &str)]) -> Option<World> {
        let (env, gateway_processes, processes, (write, read)) = match setup {
            Setup::Services => {
                let mut pipeline = Pipeline::new().await?;
                for (name, value) in env {
                    pipeline.set(name, (*value).into());
                }
                let relay = pipeline.start(&["relay"], "relay");
                let write = pipeline.start(&["write-api"], "write API");
                let read = pipeline.start(&["read-api"], "read API");
                // The read API checks workspace membership in the directory.
                let directory = pipeline.start(&["project", "postgres"], "projector");
                let gateways = vec![
                    pipeline.start(&["realtime"], "realtime gateway"),
                    pipeline.start(&["realtime"], "realtime gateway"),
                ];
                let urls = (write.url.clone(), read.url.clone());
                (pipeline.env, gateways, vec![relay, write, read, directory], urls)
            }
            Setup::Embedded => {
                let mut all = embedded();
                all.extend(env.iter().map(|(name, value)| (*name, (*value).to_owned())));
                let dev = dev(&all);
                let urls = (dev.url.clone(), dev.urls["read API"].clone());
                (all, vec![], vec![dev], urls)
            }
        };
        let gateways = match setup {
            Setup::Services => gateway_processes.iter().map(|p| p.url.clone()).collect(),
            Setup::Embedded => vec![processes[0].urls["realtime gateway"].clone(); 2],
        };
        let mut world = World {
            env,
            client: Arc::new(Client {
                http: reqwest::Client::new(),
                write,
                read,
                tokens: HashMap::new(),
                expected: Default::default(),
            }),
            users: [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()],
            workspace: Uuid::nil(),
            public: Uuid::nil(),
            private: Uuid::nil(),
            gateways,
            gateway_processes,
            _processes: processes,
        };
        let mut tokens = HashMap::new();
        for user in world.users {
            let mut command = quikapp(&["token", &user.to_string()]);
            command.envs(world.env.iter().map(|(n, v)| (*n, v.as_str())));
            let output = command.output().unwrap();
            tokens.insert(user, String::from_utf8(output.stdout).unwrap().trim().to_owned());
        }
        Arc::get_mut(&mut world.client).unwrap().tokens = tokens;
        let client = world.client.clone();
        let [owner, second, third] = world.users;
        let workspace =
            id(&client.must(owner, Method::POST, "/workspaces", Some(json!({ "name": "acme" }))).await, "workspace_id");
        world.workspace = workspace;
        for user in [second, third] {
            let body = json!({ "user_id": user, "role": "member" });
            client.must(owner, Method::POST, &format!("/workspaces/{workspace}/members"), Some(body)).await;
        }
        let path = format!("/workspaces/{workspace}/channels");
        let channel = |name: &str, private: bool| json!({ "name": name, "private": private });
        world.public =
            id(&client.must(owner, Method::POST, &path, Some(channel("general", false))).await, "channel_id");
        world.private = id(&client.must(owner, Method::POST, &path, Some(channel("secret", true))).await, "channel_id");
        for (channel, user) in [(world.public, second), (world.public, third), (world.private, second)] {
            let path = format!("/channels/{channel}/members");
            client.must(owner, Method::POST, &path, Some(json!({ "user_id": user }))).await;
        }
        Some(world)
    }

    async fn connect(&self, gateway: usize, user: Uuid, after: Option<u64>) -> Stream {
        Stream::connect(&self.gateways[gateway], &self.client.tokens[&user], after).await
    }

    async fn post(&self, author: Uuid, channel: Uuid, text: &str) -> Uuid {
        self.client.post(author, channel, text.into(), None).await
    }
}

/// Opens a stream as the holder of `token` with its `resume` frame sent in the same write as
/// the upgrade request, so that the gateway has it as the stream opens however loaded this
/// machine is (a frame sent once the 101 is read may reach it after its grace, and the stream
/// then starts at the head).
async fn connect_resuming(gateway: &str, token: &str, after: u64) -> Socket {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    let address = gateway.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut request = format!(
        "GET /v1/stream?access_token={token} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    let resume = json!({ "type": "resume", "after_position": after.to_string() }).to_string();
    // A client's text frame: final, short, masked with a key of zeros (the payload as it is).
    request.extend([0x81, 0x80 | u8::try_from(resume.len()).ok().filter(|n| *n < 126).unwrap(), 0, 0, 0, 0]);
    request.extend(resume.as_bytes());
    tcp.write_all(&request).await.unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        response.push(tcp.read_u8().await.unwrap());
    }
    assert!(response.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&response));
    let plain = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    tokio_tungstenite::WebSocketStream::from_raw_socket(plain, Role::Client, None).await
}

fn position(value: &Value) -> u64 {
    value.as_str().expect("positions are strings").parse().unwrap()
}

/// What each of three clients sees: the private channel's members (one on each gateway) its
/// message; the member who leaves, their leaving and nothing after; the outsider, nothing of
/// it. Read again by resuming after each hello, on the other gateway: the same, from the store.
async fn memberships_decide_what_each_client_sees(setup: Setup) {
    let Some(world) = World::new(setup, &[]).await else { return };
    let [owner, second, third] = world.users;
    let mut owners = world.connect(0, owner, None).await;
    let mut seconds = world.connect(1, second, None).await;
    let mut thirds = world.connect(0, third, None).await;

    let first = world.post(owner, world.private, "for the two of us").await;
    let mut owner_saw = owners.events_until(is_message(first)).await;
    let mut second_saw = seconds.events_until(is_message(first)).await;
    world.client.must(second, Method::DELETE, &format!("/channels/{}/members/{second}", world.private), None).await;
    let alone = world.post(owner, world.private, "now alone").await;
    let everyone = world.post(owner, world.public, "everyone").await;
    owner_saw.extend(owners.events_until(is_message(everyone)).await);
    second_saw.extend(seconds.events_until(is_message(everyone)).await);
    let third_saw = thirds.events_until(is_message(everyone)).await;

    let kinds = |events: &[Value]| -> Vec<(String, Option<Uuid>)> {
        events.iter().map(|e| (e["type"].as_str().unwrap().to_owned(), message_id(e))).collect()
    };
    let posted = |id: Uuid| ("MessagePosted".to_owned(), Some(id));
    let left = ("ChannelMemberLeft".to_owned(), None);
    assert_eq!(kinds(&owner_saw), [posted(first), left.clone(), posted(alone), posted(everyone)]);
    assert_eq!(kinds(&second_saw), [posted(first), left, posted(everyone)]);
    assert_eq!(kinds(&third_saw), [posted(everyone)]);
    for events in [&owner_saw, &second_saw] {
        let positions: Vec<u64> = events.iter().map(|e| e["global_position"].as_u64().unwrap()).collect();
        assert!(positions.is_sorted(), "in position order: {positions:?}");
    }

    for (user, stream, saw) in
        [(owner, &owners, &owner_saw), (second, &seconds, &second_saw), (third, &thirds, &third_saw)]
    {
        let mut again = world.connect(1, user, Some(position(&stream.hello["position"]))).await;
        assert_eq!(again.hello["position"], stream.hello["position"]);
        assert_eq!(&again.events_until(is_message(everyone)).await, saw, "{user} resumed");
    }
}

#[tokio::test]
async fn memberships_decide_what_each_client_sees_on_two_gateways() {
    memberships_decide_what_each_client_sees(Setup::Services).await;
}

#[tokio::test]
async fn memberships_decide_what_each_client_sees_on_the_embedded_default() {
    memberships_decide_what_each_client_sees(Setup::Embedded).await;
}

/// A client whose gateway is SIGKILLed reconnects to the other one and resumes after the last
/// event it had: it gets every message posted meanwhile, once each, in order.
#[tokio::test]
async fn a_client_resuming_on_another_gateway_after_a_sigkill_loses_nothing_and_gets_nothing_twice() {
    let Some(mut world) = World::new(Setup::Services, &[]).await else { return };
    let [owner, second, _] = world.users;
    let mut stream = world.connect(0, second, None).await;
    let (client, channel) = (world.client.clone(), world.public);
    let writer = tokio::spawn(async move {
        let mut posted = Vec::new();
        for i in 0..300 {
            posted.push(client.post(owner, channel, format!("message {i}"), None).await);
        }
        posted
    });
    let mut received = Vec::new();
    while received.len() < 60 {
        let event = stream.events_until(|_| true).await.remove(0);
        received.push(event);
    }
    let last = received.last().unwrap()["global_position"].as_u64().unwrap();
    world.gateway_processes[0].child.kill().unwrap(); // SIGKILL
    world.gateway_processes[0].child.wait().unwrap();

    let mut resumed = world.connect(1, second, Some(last)).await;
    let posted = writer.await.unwrap();
    received.extend(resumed.events_until(is_message(*posted.last().unwrap())).await);
    let messages: Vec<Uuid> = received.iter().filter_map(message_id).collect();
    assert_eq!(messages, posted, "every message once, in order");
}

/// Frames wait for a client in a bounded buffer: a client that reads nothing is closed with
/// 1013, while another client of the same gateway gets every message.
#[tokio::test]
async fn a_client_that_cannot_keep_up_is_closed_with_1013_and_the_others_go_on() {
    // The default buffer (1,024 frames): a healthy client's burst (what one poll of the bus
    // brings for it) stays well below it even when this machine is loaded.
    let Some(world) = World::new(Setup::Services, &[]).await else { return };
    let [owner, second, third] = world.users;
    let mut slow = Stream::connect_small(&world.gateways[0], &world.client.tokens[&second]).await;
    let mut reader = world.connect(0, third, None).await;
    // The other client reads all along.
    let (read_out, mut read) = tokio::sync::mpsc::unbounded_channel();
    let reading = tokio::spawn(async move {
        loop {
            let events = reader.events_until(|_| true).await;
            if read_out.send(events[0].clone()).is_err() {
                return;
            }
        }
    });
    let metrics = format!("{}/metrics", world.gateways[0]);
    let slow_closes = || async {
        let text = world.client.http.get(&metrics).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("quikapp_realtime_slow_closes_total "))
            .map_or(0.0, |value| value.parse::<f64>().unwrap())
    };
    // Messages until the slow client's socket and buffer are full. Large ones, so that its
    // socket is full within a few of them: until then its gateway pings it, and would end it
    // for answering none within a minute. The slow close is watched all along.
    let text = "x".repeat(30_000);
    let mut posted = Vec::new();
    let closed = AtomicBool::new(false);
    let watching = async {
        while slow_closes().await < 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        closed.store(true, Ordering::SeqCst);
    };
    let posting = async {
        while !closed.load(Ordering::SeqCst) {
            assert!(posted.len() < 5_000, "no slow close after {} messages of 30 kB", posted.len());
            posted.push(world.post(owner, world.public, &text).await);
        }
    };
    tokio::join!(watching, posting);
    // The slow client reads at once: the gateway waits a bounded time for it to take what
    // is before the close frame, and then drops the connection.
    let slow_closed = async {
        let mut taken = 0;
        loop {
            let message = deadline(Duration::from_secs(30), slow.socket.next()).await.expect("a frame within 30 s");
            match message {
                Some(Ok(Message::Text(_))) => taken += 1,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(frame))) => break (frame.map(|f| f.code), taken),
                other => panic!("the stream ended without a close frame: {other:?}"),
            }
        }
    };
    let all_read = async {
        let mut messages = Vec::new();
        while messages.last() != posted.last() {
            let event = deadline(Duration::from_secs(90), read.recv()).await.expect("read within 90 s").unwrap();
            messages.extend(message_id(&event));
        }
        messages
    };
    let ((code, taken), messages) = tokio::join!(slow_closed, all_read);
    assert_eq!(messages, posted);
    reading.abort();
    assert_eq!(code, Some(CloseCode::Again), "1013");
    assert!(taken < posted.len(), "closed before all {} messages ({taken} taken)", posted.len());
}

/// A bad or missing token is refused before the upgrade; a token in the Authorization header
/// is as good as `?access_token=`; a gateway stopping closes its streams with 1001.
#[tokio::test]
async fn tokens_are_checked_before_the_upgrade_and_a_stopping_gateway_closes_with_1001() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let Some(mut world) = World::new(Setup::Services, &[]).await else { return };
    let base = world.gateways[1].replace("http://", "ws://");
    for url in [format!("{base}/v1/stream?access_token=not-a-token"), format!("{base}/v1/stream")] {
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
            other => panic!("expected 401, got {other:?}", other = other.map(|_| ())),
        }
    }
    let [owner, ..] = world.users;
    let mut request = format!("{base}/v1/stream").into_client_request().unwrap();
    let bearer = format!("Bearer {}", world.client.tokens[&owner]);
    request.headers_mut().insert("authorization", bearer.parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("a token in the header");
    let mut stream = Stream { socket, hello: Value::Null };
    let hello = stream.frame().await.unwrap();
    assert_eq!((hello["type"].as_str(), hello["user_id"].as_str()), (Some("hello"), Some(&*owner.to_string())));

    let status = world.gateway_processes.remove(1).stop();
    assert!(status.success(), "{status}");
    let close = loop {
        match stream.socket.next().await {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
            Some(Ok(_)) => {}
            other => panic!("the stream ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(close, Some(CloseCode::Away), "1001");
}

/// Presence: a user's first stream announces them online to the others of their workspaces,
/// whatever gateway each is on, and the read API lists them; the end of their last stream
/// announces them offline, and so does the death of their gateway (within the presence TTL).
/// Typing reaches the channel's other members, and nothing comes of it from a non-member.
async fn presence_and_typing(setup: Setup) {
    let Some(mut world) = World::new(setup, &[("QUIKAPP_REALTIME_PRESENCE_TTL_SECONDS", "10")]).await else { return };
    let [owner, second, third] = world.users;
    let mut owners = world.connect(0, owner, None).await;
    let mut seconds = world.connect(1, second, None).await;
    let said = |status: &str, user: Uuid| json!({ "type": "presence", "workspace_id": world.workspace, "user_id": user, "status": status });
    assert_eq!(owners.next_of("presence").await, said("online", second));
    let mut both = vec![owner.to_string(), second.to_string()];
    both.sort();
    assert_eq!(listed(&world, third, world.workspace, 2).await, json!(both));

    // Typing: the outsider's in the private channel comes to nothing (the next typing frame is
    // the one after it).
    let mut thirds = world.connect(0, third, None).await;
    assert_eq!(owners.next_of("presence").await, said("online", third));
    thirds.send(json!({ "type": "typing", "channel_id": world.private })).await;
    thirds.send(json!({ "type": "typing", "channel_id": world.public })).await;
    let typing = owners.next_of("typing").await;
    assert_eq!(typing, json!({ "type": "typing", "channel_id": world.public, "user_id": third }));
    assert_eq!(seconds.next_of("typing").await, typing);

    // A workspace joined while streaming: the user is present there too, announced to its
    // members and listed by the read API.
    let body = json!({ "name": "later" });
    let later = id(&world.client.must(owner, Method::POST, "/workspaces", Some(body)).await, "workspace_id");
    let body = json!({ "user_id": second, "role": "member" });
    world.client.must(owner, Method::POST, &format!("/workspaces/{later}/members"), Some(body)).await;
    let joined = json!({ "type": "presence", "workspace_id": later, "user_id": second, "status": "online" });
    assert_eq!(owners.next_of("presence").await, joined);
    assert_eq!(listed(&world, owner, later, 2).await, json!(both));

    drop(thirds);
    assert_eq!(owners.next_of("presence").await, said("offline", third));
    if let Setup::Services = setup {
        world.gateway_processes[1].child.kill().unwrap(); // SIGKILL, with the second user's stream
        world.gateway_processes[1].child.wait().unwrap();
        // Offline in both workspaces, in either order.
        let mut offline = [owners.next_of("presence").await, owners.next_of("presence").await];
        let gone = json!({ "type": "presence", "workspace_id": later, "user_id": second, "status": "offline" });
        let mut expected = [said("offline", second), gone];
        let workspace_of = |frame: &Value| frame["workspace_id"].as_str().unwrap().to_owned();
        offline.sort_by_key(workspace_of);
        expected.sort_by_key(workspace_of);
        assert_eq!(offline, expected);
        for workspace in [world.workspace, later] {
            assert_eq!(listed(&world, owner, workspace, 1).await, json!([owner.to_string()]));
        }
    }
}

/// GET /workspaces/{workspace}/presence as `reader`, once it lists `count` users (30 s at most).
async fn listed(world: &World, reader: Uuid, workspace: Uuid, count: usize) -> Value {
    let path = format!("/workspaces/{workspace}/presence");
    let online = async {
        loop {
            let online = world.client.read(reader, &path).await["online"].clone();
            if online.as_array().unwrap().len() == count {
                return online;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    deadline(Duration::from_secs(30), online).await.unwrap_or_else(|| panic!("{count} listed within 30 s"))
}

#[tokio::test]
async fn presence_and_typing_on_two_gateways() {
    presence_and_typing(Setup::Services).await;
}

#[tokio::test]
async fn presence_and_typing_on_the_embedded_default() {
    presence_and_typing(Setup::Embedded).await;
}

/// On a store with no event yet, a stream opens (hello at position 0) and gets the first events
/// live; a `resume` sent after live frames began starts the stream over, with a hello of its
/// own, from the store.
#[tokio::test]
async fn a_stream_opens_on_an_empty_store_and_a_late_resume_starts_it_over() {
    let dev = dev(&embedded());
    let user = Uuid::now_v7();
    let output = quikapp(&["token", &user.to_string()]).env("QUIKAPP_JWT_SECRET", super::pipeline::SECRET).output();
    let token = String::from_utf8(output.unwrap().stdout).unwrap().trim().to_owned();
    let mut stream = Stream::connect(&dev.urls["realtime gateway"], &token, None).await;
    assert_eq!(stream.hello["position"], "0");

    let http = reqwest::Client::new();
    let create = |name: &str| {
        http.post(format!("{}/v1/workspaces", dev.url)).bearer_auth(&token).json(&json!({ "name": name })).send()
    };
    assert_eq!(create("first").await.unwrap().status(), 201);
    let first = stream.events_until(|_| true).await;
    assert_eq!(first[0]["type"], "WorkspaceCreated");
    assert_eq!(first[0]["global_position"], 1);

    stream.send(json!({ "type": "resume", "after_position": "0" })).await;
    let hello = stream.next_of("hello").await;
    assert_eq!(hello["position"], "0");
    assert_eq!(create("second").await.unwrap().status(), 201);
    let again = stream.events_until(|event| event["global_position"] == 2).await;
    let positions: Vec<&Value> = again.iter().map(|event| &event["global_position"]).collect();
    assert_eq!(positions, [1, 2], "the first again, from the store, then the second");
}
