// The messages between the main thread's worker pool (parallel.ts) and a worker thread (worker.ts).
import type { RunSettings } from "./analysis/settings.js";
import type { PairState, StageTimes } from "./analysis/schema.js";
import type { Pair } from "./data/pairs.js";
import type { RawTensor } from "./io/safetensors.js";

/** What a worker is started with. */
export interface WorkerInit {
  base: string;
  tuned: string;
  backend: string; // the backend's name in BACKENDS (backendKind())
  threads: number; // threads a call of the native matmul may use
  memoryBudget: number; // per model
  settings: RunSettings;
  pairs: Pair[];
  /** Streamed models' stored tensors in SharedArrayBuffers (the main thread's copy, not duplicated). */
  stored?: { base?: Map<string, RawTensor>; tuned?: Map<string, RawTensor> };
}

/** Work for a worker thread: score a batch of pairs, or run the mean-ablation control on one. */
export type WorkerTask =
  | { type: "batch"; start: number; end: number }
  | {
      type: "ablate";
      start: number;
      end: number;
      means: Record<string, Float32Array>;
      margin: { base: number[]; tuned: number[] };
    };

/** What a worker sends back for a task. */
export type WorkerReply =
  { type: "batch"; states: PairState[]; times: StageTimes } | { type: "ablate"; gains: number[][] };
