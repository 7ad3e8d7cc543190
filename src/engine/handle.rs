//! The engine thread: one thread owns the engine (model, KV cache, scheduler); callers
//! submit requests and read each one's events over its own channel. A request whose
//! receiver is dropped (client gone) is aborted at the next step and its blocks freed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::batch_engine::{Engine, EngineEvent, GenerateError};
use super::output::{GenerationOutput, TokenStep};
use super::sampling_params::SamplingParams;
use super::sequence::SeqId;
use crate::backend::Backend;

/// What a request's channel carries, in order: tokens, then exactly one `Finished`
/// (or `Failed`).
#[derive(Debug)]
pub enum RequestEvent {
    Token(TokenStep),
    Finished(Box<GenerationOutput>),
    Failed(String),
}

/// A snapshot of the engine for health checks and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub num_blocks: usize,
    pub free_blocks: usize,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
}

enum Command {
    Submit {
        prompt: Vec<u32>,
        params: SamplingParams,
        events: Sender<RequestEvent>,
        reply: Sender<Result<SeqId, GenerateError>>,
    },
    Abort(SeqId),
    Stats(Sender<EngineStats>),
}

pub struct EngineHandle {
    commands: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// What the engine thread publishes for readers that must never wait on a step
/// (health checks, metrics scrapes).
struct Shared {
    alive: AtomicBool,
    state: Mutex<Published>,
}

struct Published {
    stats: EngineStats,
    /// When the thread last finished a step or went idle.
    progress: Instant,
    /// Whether it has work in hand (so a stale `progress` means a stuck step).
    busy: bool,
}

impl Shared {
    fn publish<B: Backend>(&self, engine: &Engine<B>) {
        let stats = stats_of(engine);
        if let Ok(mut state) = self.state.lock() {
            *state = Published { stats, progress: Instant::now(), busy: engine.has_work() };
        }
    }
}

/// Clears `alive` when the engine thread ends, panics included.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the engine thread has stopped")]
pub struct EngineGone;

impl EngineHandle {
    /// Moves the engine onto its own thread.
    pub fn spawn<B: Backend + 'static>(engine: Engine<B>) -> std::io::Result<Self>
    where
        Engine<B>: Send,
    {
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            state: Mutex::new(Published {
                stats: stats_of(&engine),
                progress: Instant::now(),
                busy: false,
            }),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new().name("qilin-engine".into()).spawn(move || {
            let _guard = AliveGuard(for_thread.clone());
            super::workers::as_rayon_worker(|| run(engine, rx, &for_thread))
        })?;
        Ok(EngineHandle { commands: Some(tx), thread: Some(thread), shared })
    }

    /// The stats as of the end of the last step, without waiting for the current one.
    pub fn snapshot(&self) -> EngineStats {
        self.shared.state.lock().map(|s| s.stats.clone()).unwrap_or_default()
    }

    /// True while the engine thread runs and, when it has work, finished a step within
    /// `max_step`.
    pub fn is_healthy(&self, max_step: Duration) -> bool {
        if !self.shared.alive.load(Ordering::SeqCst) {
            return false;
        }
        self.shared.state.lock().is_ok_and(|s| !s.busy || s.progress.elapsed() <= max_step)
    }

    fn send(&self, command: Command) -> Result<(), EngineGone> {
        self.commands.as_ref().ok_or(EngineGone)?.send(command).map_err(|_| EngineGone)
    }

    /// Queues a request; its events arrive on the returned receiver.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<Result<(SeqId, Receiver<RequestEvent>), GenerateError>, EngineGone> {
        let (events, receiver) = channel();
        let (reply, answer) = channel();
        self.send(Command::Submit { prompt, params, events, reply })?;
        let id = answer.recv().map_err(|_| EngineGone)?;
        Ok(id.map(|id| (id, receiver)))
    }

    pub fn abort(&self, id: SeqId) -> Result<(), EngineGone> {
        self.send(Command::Abort(id))
    }

    pub fn stats(&self) -> Result<EngineStats, EngineGone> {
        let (tx, rx) = channel();
        self.send(Command::Stats(tx))?;
        rx.recv().map_err(|_| EngineGone)
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        // Closing the command channel lets the thread finish its work and exit.
        self.commands.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run<B: Backend>(mut engine: Engine<B>, commands: Receiver<Command>, shared: &Shared) {
    let mut listeners: HashMap<SeqId, Sender<RequestEvent>> = HashMap::new();
    let mut open = true;
    while open || engine.has_work() {
        // Idle: sleep until a command comes. Busy: take what is queued and step.
        if !engine.has_work() {
            shared.publish(&engine);
            match commands.recv() {
                Ok(command) => handle(&mut engine, &mut listeners, command),
                Err(_) => break,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(command) => handle(&mut engine, &mut listeners, command),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !engine.has_work() {
            continue;
        }
        shared.publish(&engine);
        match engine.step() {
            Ok(events) => route(&mut engine, &mut listeners, events),
            Err(e) => {
                tracing::error!("engine step failed: {e}");
                for (id, listener) in listeners.drain() {
                    engine.abort(id);
                    let _ = listener.send(RequestEvent::Failed(e.to_string()));
                }
            }
        }
    }
}

fn handle<B: Backend>(
    engine: &mut Engine<B>,
    listeners: &mut HashMap<SeqId, Sender<RequestEvent>>,
    command: Command,
) {
    match command {
        Command::Submit { prompt, params, events, reply } => {
            let result = engine.add_request(&prompt, &params);
            if let Ok(id) = result {
                listeners.insert(id, events);
            }
            let _ = reply.send(result);
        }
        Command::Abort(id) => {
            listeners.remove(&id);
            engine.abort(id);
        }
        Command::Stats(reply) => {
            let _ = reply.send(stats_of(engine));
        }
    }
}

fn stats_of<B: Backend>(engine: &Engine<B>) -> EngineStats {
    let s = engine.scheduler();
    let blocks = s.blocks();
    EngineStats {
        running: s.num_running(),
        waiting: s.num_waiting(),
        num_blocks: blocks.num_blocks(),
        free_blocks: blocks.num_free_blocks(),
        prefix_cache_queries: blocks.prefix_cache_queries(),
        prefix_cache_hits: blocks.prefix_cache_hits(),
        preemptions: s.num_preemptions(),
    }
}

fn route<B: Backend>(
    engine: &mut Engine<B>,
    listeners: &mut HashMap<SeqId, Sender<RequestEvent>>,
    events: Vec<EngineEvent>,
) {
    for event in events {
        match event {
            EngineEvent::Token { seq, step } => {
                let delivered =
                    listeners.get(&seq).is_some_and(|l| l.send(RequestEvent::Token(step)).is_ok());
                if !delivered {
                    // Nobody is listening any more: stop spending compute on it.
                    listeners.remove(&seq);
                    engine.abort(seq);
                }
            }
            EngineEvent::Finished { seq, output } => {
                if let Some(listener) = listeners.remove(&seq) {
                    let _ = listener.send(RequestEvent::Finished(output));
                }
            }
        }
    }
}
