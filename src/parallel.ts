// Phase 1 of a run on several worker threads (each with its own backend and copy of the models): batches are
// handed out as workers free up and their pair states are passed on in batch order, so a pair's numbers and
// the run's files are the same as with one thread.
import * as os from "node:os";
import { Worker } from "node:worker_threads";
import { Interrupted, type PairState, type RunCallbacks, type StageTimes } from "./analysis/settings.js";
import type { WorkerInit } from "./worker.js";
import type { AblationRunner } from "./analysis/controls.js";

/** Worker threads a run uses by default: one per core on the single-threaded wasm and cpu backends, else 1. */
export function defaultWorkers(backend: string): number {
  return backend.startsWith("wasm") || backend === "cpu" ? os.availableParallelism() : 1;
}

/** Starts a worker from the compiled worker.js, or from worker.ts through tsx when running from source. */
function startWorker(init: WorkerInit): Worker {
  if (!import.meta.url.endsWith(".ts")) return new Worker(new URL("./worker.js", import.meta.url), { workerData: init });
  const url = new URL("./worker.ts", import.meta.url).href;
  const boot = `import("tsx/esm/api").then(({ register }) => { register(); return import(${JSON.stringify(url)}); })`;
  return new Worker(boot, { eval: true, workerData: init });
}

/** Work for a worker thread: score a batch of pairs, or run the mean-ablation control on one. */
export type WorkerTask =
  | { type: "batch"; start: number; end: number }
  | { type: "ablate"; start: number; end: number; means: Record<string, Float32Array>; margin: { base: number[]; tuned: number[] } };

/** What a worker sends back for a task. */
export type WorkerReply = { type: "batch"; states: PairState[]; times: StageTimes } | { type: "ablate"; gains: number[][] };

/**
 * Runs `tasks` on up to `count` workers, handing each out as a worker frees up; onResult sees every reply (in
 * any order). Once shouldStop says so no new task is handed out and the ones in flight finish. Returns whether it
 * stopped early.
 */
async function runPool(init: WorkerInit, tasks: WorkerTask[], count: number, onResult: (id: number, reply: WorkerReply) => void, shouldStop?: () => boolean): Promise<boolean> {
  if (tasks.length === 0) return false;
  const workers = Array.from({ length: Math.max(1, Math.min(count, tasks.length)) }, () => startWorker(init));
  const exited = workers.map((w) => new Promise((r) => w.once("exit", r)));
  let failed = false;
  let next = 0;
  let stopped = false;
  try {
    await new Promise<void>((resolve, reject) => {
      const fail = (msg: string) => ((failed = true), reject(new Error(msg)));
      const inFlight = new Set<number>();
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
      for (const w of workers) {
        w.on("error", (e) => fail(`worker: ${e.message}`));
        w.on("message", (m: { type: "ready" } | { type: "done"; id: number; reply: WorkerReply } | { type: "error"; id: number; message: string }) => {
          if (m.type === "error") return fail(m.message);
          if (m.type === "done") {
            inFlight.delete(m.id);
            onResult(m.id, m.reply);
          }
          give(w);
        });
      }
    });
  } finally {
    if (failed) await Promise.all(workers.map((w) => w.terminate()));
    else for (const w of workers) w.postMessage({ type: "close" });
    await Promise.all(exited);
  }
  return stopped;
}

/**
 * Scores `batches` on `count` workers. cb.onPairs sees each batch's states in batch order; cb.shouldStop
 * stops handing out batches, lets the ones in flight finish (and reach onPairs), then throws Interrupted.
 */
export async function analyseInWorkers(init: WorkerInit, batches: Array<[number, number]>, count: number, cb: RunCallbacks = {}, done = 0): Promise<PairState[]> {
  const total = batches.reduce((a, [b, e]) => a + e - b, 0) + done;
  cb.onStage?.("scoring and patching", total);
  cb.onProgress?.(done);
  const results = new Map<number, PairState[]>();
  const out: PairState[] = [];
  let emitted = 0; // batches passed on, in order
  const onResult = (id: number, reply: WorkerReply) => {
    if (reply.type !== "batch") return;
    cb.onTimes?.(reply.times);
    results.set(id, reply.states.map((s) => ({ record: s.record, sums: new Float64Array(s.sums.buffer) })));
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
  if (await runPool(init, tasks, count, onResult, cb.shouldStop)) throw new Interrupted(done, total);
  return out;
}

/** An AblationRunner (finishAnalysis's mean-ablation control) on `count` workers; the gains equal one thread's. */
export const ablateInWorkers =
  (init: WorkerInit, count: number, onProgress?: (pairs: number) => void): AblationRunner =>
  async (batches, means, margins) => {
    const gains: number[][][] = new Array(batches.length);
    let pairs = 0;
    const tasks = batches.map(([start, end], bi): WorkerTask => ({ type: "ablate", start, end, means, margin: margins[bi]! }));
    await runPool(init, tasks, count, (id, reply) => {
      if (reply.type !== "ablate") return;
      gains[id] = reply.gains;
      onProgress?.((pairs += batches[id]![1] - batches[id]![0]));
    });
    return gains;
  };
