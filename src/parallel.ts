// A run on several worker threads (each with its own backend and copy of the models), kept for the whole run:
// phase 1's batches are handed out as workers free up and their pair states are passed on in batch order, so a
// pair's numbers and the run's files are the same as with one thread; then the mean-ablation control's batches.
import * as os from "node:os";
import { Worker } from "node:worker_threads";
import { Interrupted, type PairState, type RunCallbacks } from "./analysis/schema.js";
import type { WorkerInit, WorkerReply, WorkerTask } from "./protocol.js";
import type { AblationRunner } from "./analysis/controls.js";
import type { Pair } from "./data/pairs.js";
import type { LlamaConfig } from "./model/config.js";
import { usesWasmHeap } from "./model/backend.js";

/**
 * Memory a wasm worker may take at most: its heap can grow to 4 GiB, plus its own JavaScript (measured 0.25–0.3
 * GiB at Llama-3.2-1B width); and what a run keeps outside its workers besides the stored weights.
 */
export const WASM_WORKER_BYTES = 4.25 * 2 ** 30;
export const MAIN_THREAD_BYTES = 2 * 2 ** 30;

/**
 * Worker threads a run uses by default: one per core on the single-threaded wasm and cpu backends, else 1; on
 * wasm no more than the machine's memory holds beside `heldBytes` (the models' stored weights in Node memory),
 * counting each worker's whole heap, so a small machine gets fewer workers rather than running out of memory.
 */
export function defaultWorkers(
  backend: string,
  heldBytes = 0,
  machine = { cores: os.availableParallelism(), memory: os.totalmem() },
): number {
  if (backend === "cpu") return machine.cores;
  if (!usesWasmHeap(backend)) return 1;
  return Math.max(
    1,
    Math.min(machine.cores, Math.floor((machine.memory - heldBytes - MAIN_THREAD_BYTES) / WASM_WORKER_BYTES)),
  );
}

/**
 * Multiply-adds ×2 below which a run's per-pair stages take seconds on one thread, so that starting workers
 * (each its own backend and copy of the models) costs about what they save.
 */
export const WORKER_MIN_FLOPS = 5e10;

/** A rough count of a run's per-pair work: each model's forward over every token, once per layer patched and once more. */
export function runFlops(cfg: LlamaConfig, pairs: Pair[]): number {
  const { hiddenSize: H, intermediateSize: I, numHeads: nH, numKvHeads: nKv, headDim: d, numLayers: L } = cfg;
  const perToken = 2 * L * (2 * H * nH * d + 2 * H * nKv * d + 3 * H * I);
  const tokens = pairs.reduce((a, p) => a + p.promptIds.length + p.chosenIds.length + p.rejectedIds.length, 0);
  return 2 * perToken * tokens * (L + 1);
}

/** Starts a worker from the compiled worker.js, or from worker.ts through tsx when running from source. */
function startWorker(init: WorkerInit): Worker {
  if (!import.meta.url.endsWith(".ts"))
    return new Worker(new URL("./worker.js", import.meta.url), { workerData: init });
  const url = new URL("./worker.ts", import.meta.url).href;
  const boot = `import("tsx/esm/api").then(({ register }) => { register(); return import(${JSON.stringify(url)}); })`;
  return new Worker(boot, { eval: true, workerData: init });
}

/**
 * Worker threads kept for a whole run (scoring, then the mean-ablation control), so each starts its backend and
 * loads the models once. run() hands tasks out as workers free up; close() ends them.
 */
export class WorkerPool {
  private readonly workers: Worker[];
  private readonly exited: Array<Promise<unknown>>;
  private ready: Promise<void>;
  private listener: ((w: Worker, m: WorkerMessage) => void) | null = null;
  private failure: ((e: Error) => void) | null = null;
  private broken: Error | null = null;
  private closed = false;

  constructor(init: WorkerInit, count: number) {
    this.workers = Array.from({ length: Math.max(1, count) }, () => startWorker(init));
    this.exited = this.workers.map((w) => new Promise((r) => w.once("exit", r)));
    let started = 0;
    this.ready = new Promise<void>((resolve) => {
      for (const w of this.workers) {
        w.on("error", (e) => this.fail(new Error(`worker: ${e.message}`)));
        w.on("message", (m: WorkerMessage) => {
          if (m.type === "error") return this.fail(new Error(m.message));
          if (m.type === "ready" && ++started === this.workers.length) resolve();
          if (m.type === "done") this.listener?.(w, m);
        });
      }
    });
  }

  get size(): number {
    return this.workers.length;
  }

  private fail(e: Error): void {
    this.broken ??= e;
    this.failure?.(e);
  }

  /**
   * Runs `tasks`, onResult seeing every reply (in any order). Once shouldStop says so no new task is handed out
   * and the ones in flight finish. Returns whether it stopped early.
   */
  async run(
    tasks: WorkerTask[],
    onResult: (id: number, reply: WorkerReply) => void,
    shouldStop?: () => boolean,
  ): Promise<boolean> {
    if (this.broken) throw this.broken;
    if (tasks.length === 0) return false;
    await Promise.race([this.ready, new Promise<void>((_, reject) => (this.failure = reject))]);
    let next = 0;
    let stopped = false;
    const inFlight = new Set<number>();
    try {
      await new Promise<void>((resolve, reject) => {
        this.failure = reject;
        const give = (w: Worker) => {
          if (!stopped && shouldStop?.()) stopped = true;
          if (stopped || next >= tasks.length) {
            if (inFlight.size === 0) resolve();
            return;
          }
          const id = next++;
          inFlight.add(id);
          w.postMessage({ type: "task", id, task: tasks[id] });
        };
        this.listener = (w, m) => {
          if (m.type !== "done") return;
          inFlight.delete(m.id);
          onResult(m.id, m.reply);
          give(w);
        };
        for (const w of this.workers) give(w);
      });
    } finally {
      this.listener = null;
      this.failure = null;
    }
    return stopped;
  }

  /** Ends the workers (at once after a failure, else after they free their models); again is a no-op. */
  async close(): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      if (this.broken) await Promise.all(this.workers.map((w) => w.terminate()));
      else for (const w of this.workers) w.postMessage({ type: "close" });
    }
    await Promise.all(this.exited);
  }
}

type WorkerMessage =
  { type: "ready" } | { type: "done"; id: number; reply: WorkerReply } | { type: "error"; id: number; message: string };

/**
 * Scores `batches` on the pool. cb.onPairs sees each batch's states in batch order; cb.shouldStop stops handing
 * out batches, lets the ones in flight finish (and reach onPairs), then throws Interrupted.
 */
export async function analyseInWorkers(
  pool: WorkerPool,
  batches: Array<[number, number]>,
  cb: RunCallbacks = {},
  done = 0,
): Promise<PairState[]> {
  const total = batches.reduce((a, [b, e]) => a + e - b, 0) + done;
  cb.onStage?.("scoring and patching", total);
  cb.onProgress?.(done);
  const results = new Map<number, PairState[]>();
  const out: PairState[] = [];
  let emitted = 0; // batches passed on, in order
  const onResult = (id: number, reply: WorkerReply) => {
    if (reply.type !== "batch") return;
    cb.onTimes?.(reply.times);
    results.set(
      id,
      reply.states.map((s) => ({ record: s.record, sums: new Float64Array(s.sums.buffer) })),
    );
    while (results.has(emitted)) {
      const states = results.get(emitted)!;
      results.delete(emitted);
      out.push(...states);
      cb.onPairs?.(states);
      done += states.length;
      cb.onProgress?.(done);
      emitted++;
    }
  };
  const tasks = batches.map(([start, end]): WorkerTask => ({ type: "batch", start, end }));
  if (await pool.run(tasks, onResult, cb.shouldStop)) throw new Interrupted(done, total);
  return out;
}

/** An AblationRunner (finishAnalysis's mean-ablation control) on the pool; the gains equal one thread's. */
export const ablateInWorkers =
  (pool: WorkerPool, onProgress?: (pairs: number) => void): AblationRunner =>
  async (batches, means, margins) => {
    const gains: number[][][] = new Array(batches.length);
    let pairs = 0;
    const tasks = batches.map(([start, end], bi): WorkerTask => ({
      type: "ablate",
      start,
      end,
      means,
      margin: margins[bi]!,
    }));
    await pool.run(tasks, (id, reply) => {
      if (reply.type !== "ablate") return;
      gains[id] = reply.gains;
      onProgress?.((pairs += batches[id]![1] - batches[id]![0]));
    });
    return gains;
  };
