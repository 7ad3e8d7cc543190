//! The engine thread: one thread owns the engine (model, KV cache, scheduler); callers
//! submit requests and read each one's events over its own channel. A request whose
//! receiver is dropped (client gone) is aborted at the next step and its blocks freed.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

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
        let thread = std::thread::Builder::new()
            .name("qilin-engine".into())
            .spawn(move || run(engine, rx))?;
        Ok(EngineHandle { commands: Some(tx), thread: Some(thread) })
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

fn run<B: Backend>(mut engine: Engine<B>, commands: Receiver<Command>) {
    let mut listeners: HashMap<SeqId, Sender<RequestEvent>> = HashMap::new();
    let mut open = true;
    while open || engine.has_work() {
        // Idle: sleep until a command comes. Busy: take what is queued and step.
        if !engine.has_work() {
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
            let s = engine.scheduler();
            let blocks = s.blocks();
            let _ = reply.send(EngineStats {
                running: s.num_running(),
                waiting: s.num_waiting(),
                num_blocks: blocks.num_blocks(),
                free_blocks: blocks.num_free_blocks(),
                prefix_cache_queries: blocks.prefix_cache_queries(),
                prefix_cache_hits: blocks.prefix_cache_hits(),
                preemptions: s.num_preemptions(),
            });
        }
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
