//! Building and controlling an in-process cluster.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tether_common::discovery::memory::MemoryDiscovery;
use tether_common::discovery::{Discovery, NodeKind};
use tether_common::tls::{Authority, Tls};
use tether_edge::EdgeConfig;
use tether_shard::ShardConfig;
use tether_worker::WorkerConfig;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::wait;

/// One node: a thread running a service's `serve()` on its own runtime.
pub struct Node {
    pub id: String,
    pub addr: SocketAddr,
    pub kind: Option<NodeKind>,
    shutdown: CancellationToken,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Node {
    fn spawn<F, Fut>(id: String, kind: Option<NodeKind>, serve: F) -> Node
    where
        F: FnOnce(tokio::net::TcpListener, CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().expect("bound address");
        let shutdown = CancellationToken::new();
        let (kill, killed) = oneshot::channel::<()>();
        let token = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(id.clone())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("node runtime");
                let result = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        result = serve(listener, token) => result,
                        _ = killed => Err("killed".to_owned()),
                    }
                });
                // Dropping the runtime aborts every task of the node: connections drop.
                runtime.shutdown_background();
                result
            })
            .expect("spawn node thread");
        Node { id, addr, kind, shutdown, kill: Some(kill), thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A node that runs nothing (stands in for one moved out of a cluster's list).
    pub fn idle(id: &str) -> Node {
        Node {
            id: id.to_owned(),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            kind: None,
            shutdown: CancellationToken::new(),
            kill: None,
            thread: None,
        }
    }

    /// Crashes the node: its runtime is dropped, nothing is deregistered.
    pub fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Asks the node to shut down gracefully and waits for it.
    pub fn shutdown(&mut self) -> Result<(), String> {
        self.shutdown.cancel();
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| "node panicked".to_owned())?,
            None => Ok(()),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub discovery: MemoryDiscovery,
    pub edges: Vec<Node>,
    pub workers: Vec<Node>,
    pub shards: Vec<Node>,
    worker_config: WorkerConfig,
    tls: Option<Arc<Authority>>,
}

pub struct ClusterBuilder {
    shards: usize,
    workers: usize,
    edges: usize,
    shard_config: ShardConfig,
    worker_config: WorkerConfig,
    edge_config: EdgeConfig,
    tls: Option<Arc<Authority>>,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            shards: 2,
            workers: 3,
            edges: 1,
            shard_config: ShardConfig::for_test(),
            worker_config: WorkerConfig::for_test(),
            edge_config: EdgeConfig::for_test(),
            tls: None,
        }
    }

    /// The first edge's base URL (`http://127.0.0.1:port`).
    pub fn url(&self) -> String {
        self.edges[0].url()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/responses", self.edges[0].addr)
    }

    /// Starts one more worker and waits until it is registered.
    pub async fn add_worker(&mut self, id: &str) {
        let shared: Arc<dyn Discovery> = Arc::new(self.discovery.clone());
        self.workers.push(spawn_worker(&self.worker_config, self.tls.as_deref(), &shared, id));
        let discovery = self.discovery.clone();
        let id = id.to_owned();
        wait::until(Duration::from_secs(10), "the new worker registered", || {
            let present = discovery.members(NodeKind::Worker).contains_key(&id);
            async move { present.then_some(()) }
        })
        .await;
    }

    /// The shard node with `id`.
    pub fn shard(&mut self, id: &str) -> &mut Node {
        self.shards.iter_mut().find(|node| node.id == id).unwrap_or_else(|| panic!("no shard {id}"))
    }

    /// The worker node with `id`.
    pub fn worker(&mut self, id: &str) -> &mut Node {
        self.workers.iter_mut().find(|node| node.id == id).unwrap_or_else(|| panic!("no worker {id}"))
    }
}

/// A node's TLS material from the cluster CA: its id, `localhost` and `127.0.0.1` as SANs.
pub fn node_tls(authority: &Authority, id: &str) -> Tls {
    authority.node_tls(id, &["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("issue a node certificate")
}

fn spawn_worker(config: &WorkerConfig, tls: Option<&Authority>, discovery: &Arc<dyn Discovery>, id: &str) -> Node {
    let mut config = config.clone();
    config.id = Some(id.to_owned());
    config.tls = tls.map(|authority| node_tls(authority, id));
    let discovery = discovery.clone();
    Node::spawn(id.to_owned(), Some(NodeKind::Worker), move |listener, token| async move {
        tether_worker::serve(config, listener, discovery, token).await.map_err(|e| e.to_string())
    })
}

impl ClusterBuilder {
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    pub fn edges(mut self, n: usize) -> Self {
        self.edges = n;
        self
    }

    pub fn shard_config(mut self, change: impl FnOnce(&mut ShardConfig)) -> Self {
        change(&mut self.shard_config);
        self
    }

    pub fn worker_config(mut self, change: impl FnOnce(&mut WorkerConfig)) -> Self {
        change(&mut self.worker_config);
        self
    }

    pub fn edge_config(mut self, change: impl FnOnce(&mut EdgeConfig)) -> Self {
        change(&mut self.edge_config);
        self
    }

    /// Mutual TLS on the internal plane: every node gets its own certificate from `authority`
    /// (SANs: its id, `localhost`, `127.0.0.1`) and members advertise `https://` addresses.
    pub fn tls(mut self, authority: Arc<Authority>) -> Self {
        self.tls = Some(authority);
        self
    }

    /// Starts the nodes and waits until every edge is ready.
    pub async fn start(self) -> Cluster {
        tether_common::telemetry::init_for_test();
        let discovery = MemoryDiscovery::new();
        let shared: Arc<dyn Discovery> = Arc::new(discovery.clone());
        let shards = (0..self.shards)
            .map(|i| {
                let mut config = self.shard_config.clone();
                config.id = Some(format!("shard-{i}"));
                config.tls = self.tls.as_deref().map(|authority| node_tls(authority, &format!("shard-{i}")));
                let discovery = shared.clone();
                Node::spawn(format!("shard-{i}"), Some(NodeKind::Shard), move |listener, token| async move {
                    tether_shard::serve(config, listener, discovery, token).await.map_err(|e| e.to_string())
                })
            })
            .collect();
        let workers = (0..self.workers)
            .map(|i| spawn_worker(&self.worker_config, self.tls.as_deref(), &shared, &format!("worker-{i}")))
            .collect();
        let edges: Vec<Node> = (0..self.edges)
            .map(|i| {
                let mut config = self.edge_config.clone();
                config.tls = self.tls.as_deref().map(|authority| node_tls(authority, &format!("edge-{i}")));
                let discovery = shared.clone();
                Node::spawn(format!("edge-{i}"), None, move |listener, token| async move {
                    tether_edge::serve(config, listener, discovery, token).await.map_err(|e| e.to_string())
                })
            })
            .collect();
        let cluster = Cluster { discovery, edges, workers, shards, worker_config: self.worker_config, tls: self.tls };
        let http = reqwest::Client::new();
        for edge in &cluster.edges {
            let url = format!("{}/readyz", edge.url());
            wait::until(Duration::from_secs(20), "edge ready", || {
                let (http, url) = (http.clone(), url.clone());
                async move { http.get(&url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
            })
            .await;
        }
        let expected = (self.workers, self.shards);
        wait::until(Duration::from_secs(10), "all nodes registered", || {
            let counts =
                (cluster.discovery.members(NodeKind::Worker).len(), cluster.discovery.members(NodeKind::Shard).len());
            async move { (counts == expected).then_some(()) }
        })
        .await;
        cluster
    }
}
