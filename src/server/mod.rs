//! The HTTP shim: OpenAI-compatible routes on a loopback address or a unix socket.
//! One thread per connection parses, authenticates and streams; all of them talk to
//! the one engine thread through `EngineHandle` and never block it.
//!
//! HTTP/1.1 is handled here on top of `httparse` rather than by tiny_http: tiny_http
//! hides the socket, so a client that disconnects while a non-streaming answer is being
//! computed could not be noticed (its sequence would run to the end), it sets no read
//! timeouts (a slow client holds a thread forever), and its chunked writer buffers
//! 8 KiB, which would batch SSE tokens.

pub mod audit;
pub mod auth;
pub mod error;
pub mod generation;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod openai;
pub mod openai_response;
pub mod proxy;
pub mod routes;
pub mod sse;
pub mod state;
pub mod tool_calls;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

pub use error::ApiError;

use crate::config::ServeArgs;
use crate::engine::load::load_engine;
use audit::AuditLog;
use auth::ApiKeys;
use http::{Conn, Limits};
use listen::{Listener, Stream, Waker};
use metrics::Metrics;
use proxy::TrustedProxies;
use state::App;

/// `--chat-template FILE`: its text, compiled once here so that a broken template fails
/// before the model loads, with the file's name.
fn read_chat_template(path: &std::path::Path) -> anyhow::Result<String> {
    let source = std::fs::read_to_string(path)
        .with_context(|| format!("--chat-template {}: cannot read the file", path.display()))?;
    crate::tokenizer::ChatTemplate::new(&source)
        .with_context(|| format!("--chat-template {}: not a valid template", path.display()))?;
    Ok(source)
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let request_timeout = positive_seconds("--request-timeout", args.request_timeout)?;
    let shutdown_timeout = positive_seconds("--shutdown-timeout", args.shutdown_timeout)?;
    if args.max_body_bytes == 0 {
        bail!("--max-body-bytes must be at least 1");
    }
    if args.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    // Everything that can be wrong with the flags fails before the model loads.
    let mut keys = ApiKeys::load(args.api_key_file.as_deref(), |name| std::env::var(name).ok())?;
    let proxies = TrustedProxies::parse(&args.trusted_proxy)?;
    let audit = args.audit_log.as_deref().map(AuditLog::open).transpose()?;
    let chat_template = args.chat_template.as_deref().map(read_chat_template).transpose()?;
    let listener = match &args.uds {
        Some(path) => Listener::bind_unix(path)?,
        None => Listener::bind_tcp(&args.host, args.port)?,
    };

    let model_path = args.engine.model_path()?;
    let (engine, defaults) = load_engine(&model_path, &args.engine.engine_options())?;
    let tokenizer = match chat_template {
        // Only the HTTP side renders templates; the engine decodes with the same vocabulary.
        Some(source) => engine.tokenizer().with_chat_template(source)?,
        None => engine.tokenizer().clone(),
    };
    let max_model_len = engine.max_model_len();
    let engine = engine.spawn().context("starting the engine thread")?;
    if keys.is_empty() {
        let (generated, token) = ApiKeys::generate();
        keys = generated;
        // Printed once, here only: the operator copies it or configures real keys.
        eprintln!("generated API key for this run (label \"generated\"): {token}");
    }
    let served_names = if args.served_model_name.is_empty() {
        vec![default_model_name(&model_path)]
    } else {
        args.served_model_name.clone()
    };
    let app = Arc::new(App {
        engine,
        tokenizer,
        defaults,
        max_model_len,
        served_names,
        keys,
        metrics_public: args.metrics_public,
        metrics: Metrics::new(),
        audit,
        proxies,
        request_timeout,
        max_in_flight: args.engine.max_num_seqs + args.max_queued_requests,
        in_flight: AtomicUsize::new(0),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        draining: AtomicBool::new(false),
        aborting: AtomicBool::new(false),
    });
    watch_signals(app.clone(), listener.waker())?;
    let limits = Limits { max_body_bytes: args.max_body_bytes, ..Limits::default() };
    eprintln!("listening on {} (model: {})", listener.describe(), app.model_name());
    accept_loop(&app, &listener, &limits, args.max_connections);
    // Closed before the drain, so new connections are refused (not left waiting in the
    // backlog) while in-flight requests finish.
    drop(listener);
    drain(&app, shutdown_timeout);
    if let Some(audit) = &app.audit {
        if let Err(e) = audit.sync() {
            tracing::error!("flushing the audit log failed: {e}");
        }
    }
    tracing::info!("shut down");
    Ok(())
}

fn accept_loop(app: &Arc<App>, listener: &Listener, limits: &Limits, max_connections: usize) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if app.is_draining() {
            break;
        }
        if open.fetch_add(1, Ordering::SeqCst) >= max_connections {
            open.fetch_sub(1, Ordering::SeqCst);
            let mut conn = Conn::new(stream, limits.clone());
            routes::refuse_connection(&mut conn);
            continue;
        }
        let (app, limits, open) = (app.clone(), limits.clone(), open.clone());
        let spawned = std::thread::Builder::new().name("qilin-http".into()).spawn(move || {
            serve_connection(&app, stream, limits);
            open.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a connection thread: {e}");
        }
    }
}

fn serve_connection(app: &App, stream: Stream, limits: Limits) {
    let peer = stream.peer_ip();
    let mut conn = Conn::new(stream, limits);
    loop {
        match conn.read_request() {
            Ok(None) => break,
            Err(error) => {
                routes::reject(app, &mut conn, error, peer);
                break;
            }
            Ok(Some(request)) => {
                if !routes::handle(app, &mut conn, request, peer) || app.is_draining() {
                    break;
                }
            }
        }
    }
    conn.stream.shutdown();
}

/// SIGTERM / SIGINT: stop accepting and drain. A second signal aborts at once.
fn watch_signals(app: Arc<App>, waker: Waker) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing the signal handlers")?;
    std::thread::Builder::new().name("qilin-signals".into()).spawn(move || {
        for signal in signals.forever() {
            if app.draining.swap(true, Ordering::SeqCst) {
                tracing::warn!("second signal {signal}: aborting in-flight requests");
                app.aborting.store(true, Ordering::SeqCst);
            } else {
                tracing::info!("signal {signal}: no new requests; draining");
                waker.wake();
            }
        }
    })?;
    Ok(())
}

/// Lets in-flight generations finish within `grace`, then aborts the rest and waits
/// for their connection threads to record them.
fn drain(app: &App, grace: Duration) {
    let deadline = Instant::now() + grace;
    while app.in_flight() > 0 && Instant::now() < deadline && !app.is_aborting() {
        std::thread::sleep(Duration::from_millis(20));
    }
    if app.in_flight() > 0 {
        tracing::warn!(
            "{} requests still running after the grace period: aborting",
            app.in_flight()
        );
    }
    app.aborting.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.in_flight() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn positive_seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{flag} must be a positive number of seconds, got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

/// The file or directory name without a `.gguf` extension: what clients put in `model`.
fn default_model_name(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match name.strip_suffix(".gguf") {
        Some(stem) if !stem.is_empty() => stem.to_string(),
        _ if name.is_empty() => "qilin".into(),
        _ => name,
    }
}
