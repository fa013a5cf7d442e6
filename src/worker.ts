// A worker thread of a parallel run: its own tfjs backend (on wasm its own 4 GiB heap) and its own copy of both
// models; it scores the batches the main thread sends and returns each pair's state, or runs the mean-ablation
// control on a batch (parallel.ts drives it).
import { parentPort, workerData } from "node:worker_threads";
import { analyseBatch } from "./analysis/run.js";
import { meanAblationBatch } from "./analysis/controls.js";
import type { WorkerInit, WorkerReply, WorkerTask } from "./protocol.js";
import { makePlan } from "./analysis/scoring.js";
import { runsAttribution } from "./analysis/settings.js";
import { type StageTimes } from "./analysis/schema.js";
import { enableGradients } from "./model/gradients.js";
import { loadModelSync } from "./io/model.js";
import { shareResidency } from "./io/stream.js";
import type { RawTensor } from "./io/safetensors.js";
import { explainBackendError, initBackend } from "./model/backend.js";
import { disposeModel } from "./model/llama.js";

const port = parentPort!;
const init = workerData as WorkerInit;
try {
  await initBackend(init.backend, { threads: init.threads });
  if (runsAttribution(init.settings)) await enableGradients();
  const load = (dir: string, stored?: Map<string, RawTensor>) =>
    loadModelSync(dir, { memoryBudget: init.memoryBudget, stored });
  const models = { base: load(init.base, init.stored?.base), tuned: load(init.tuned, init.stored?.tuned) };
  shareResidency([models.base.source, models.tuned.source]);
  const plan = makePlan(init.settings, models.base.config.numLayers);
  port.on("message", (m: { type: "task"; id: number; task: WorkerTask } | { type: "close" }) => {
    if (m.type === "close") {
      disposeModel(models.base);
      disposeModel(models.tuned);
      port.close();
      return;
    }
    try {
      const t = m.task;
      const pairs = init.pairs.slice(t.start, t.end);
      if (t.type === "ablate") {
        const reply: WorkerReply = {
          type: "ablate",
          gains: meanAblationBatch(models, pairs, plan, t.means, t.margin, init.settings),
        };
        port.postMessage({ type: "done", id: m.id, reply });
        return;
      }
      const times: StageTimes = {};
      const states = analyseBatch(models, pairs, plan, init.settings, times);
      const reply: WorkerReply = { type: "batch", states, times };
      port.postMessage(
        { type: "done", id: m.id, reply },
        states.map((s) => s.sums.buffer as ArrayBuffer),
      );
    } catch (e) {
      port.postMessage({ type: "error", id: m.id, message: (explainBackendError(e) as Error).message });
    }
  });
  port.postMessage({ type: "ready" });
} catch (e) {
  port.postMessage({ type: "error", id: -1, message: (e as Error).message });
}
