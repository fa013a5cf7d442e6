// Phase 1 of a run on several worker threads (each with its own backend and copy of the models): batches are
// handed out as workers free up and their pair states are passed on in batch order, so a pair's numbers and
// the run's files are the same as with one thread.
import * as os from "node:os";
import { Worker } from "node:worker_threads";
import { Interrupted, type PairState, type RunCallbacks, type StageTimes } from "./analysis/settings.js";
import type { WorkerInit } from "./worker.js";

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

/**
 * Scores `batches` on `count` workers. cb.onPairs sees each batch's states in batch order; cb.shouldStop
 * stops handing out batches, lets the ones in flight finish (and reach onPairs), then throws Interrupted.
 */
export async function analyseInWorkers(init: WorkerInit, batches: Array<[number, number]>, count: number, cb: RunCallbacks = {}, done = 0): Promise<PairState[]> {
  const total = batches.reduce((a, [b, e]) => a + e - b, 0) + done;
  cb.onStage?.("scoring and patching", total);
  cb.onProgress?.(done);
  if (batches.length === 0) return [];
  const workers = Array.from({ length: Math.max(1, Math.min(count, batches.length)) }, () => startWorker(init));
  const exited = workers.map((w) => new Promise((r) => w.once("exit", r)));
  let failed = false;
  const results = new Map<number, PairState[]>();
  const out: PairState[] = [];
  let next = 0; // next batch to hand out
  let emitted = 0; // batches passed on, in order
  let stopped = false;
  try {
    await new Promise<void>((resolve, reject) => {
      const fail = (msg: string) => ((failed = true), reject(new Error(msg)));
      const emit = () => {
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
      const inFlight = new Set<number>();
      const give = (w: Worker) => {
        if (!stopped && cb.shouldStop?.()) stopped = true;
        if (stopped || next >= batches.length) {
          if (inFlight.size === 0) resolve();
          return;
        }
        const id = next++;
        inFlight.add(id);
        w.postMessage({ type: "batch", id, start: batches[id]![0], end: batches[id]![1] });
      };
      for (const w of workers) {
        w.on("error", (e) => fail(`worker: ${e.message}`));
        w.on("message", (m: { type: "ready" } | { type: "done"; id: number; states: PairState[]; times: StageTimes } | { type: "error"; id: number; message: string }) => {
          if (m.type === "error") return fail(m.message);
          if (m.type === "done") {
            inFlight.delete(m.id);
            cb.onTimes?.(m.times);
            results.set(m.id, m.states.map((s) => ({ record: s.record, sums: new Float64Array(s.sums.buffer) })));
            emit();
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
  if (stopped) throw new Interrupted(done, total);
  return out;
}
