// The webgpu backend against wasm (and the native matmul where it is built), in one run: 2-D matmul GFLOP/s at a
// few shapes up to Llama-3.2-1B's, the cost of one small kernel and its read back, and a forward of the demo
// model (stories260k) in tokens/s; with the largest difference of each product from wasm's, as a fraction of the
// float32 rounding bound K·2⁻²⁴·max Σ|a·b|. Ratios, not absolute times, are what to compare: the machine is noisy.
// Run: npm run bench:webgpu (a real GPU), or PREFPROBE_WEBGPU=software npm run bench:webgpu (llvmpipe, as CI).
import * as tf from "@tensorflow/tfjs-core";
import { initBackend } from "../src/model/backend.js";
import { nativeStatus } from "../src/model/native.js";
import { loadModelSync } from "../src/io/model.js";
import { disposeModel, forward } from "../src/model/llama.js";

const SHAPES: Array<[number, number, number]> = [
  [64, 256, 128],
  [128, 2048, 2048],
  [128, 2048, 8192],
  [512, 2048, 2048],
];
const REPS = 3;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** Milliseconds of `run` until its result is back on the CPU: the median of REPS after one warm-up. */
function timed(run: () => tf.Tensor): { ms: number; values: Float32Array } {
  let values = new Float32Array(0);
  const times: number[] = [];
  for (let r = 0; r <= REPS; r++) {
    const t0 = performance.now();
    const y = run();
    const v = y.dataSync() as Float32Array; // waits for the kernel: a GPU runs asynchronously
    if (r > 0) times.push(performance.now() - t0);
    else values = Float32Array.from(v);
    y.dispose();
  }
  return { ms: median(times), values };
}

interface Measured {
  backend: string;
  matmul: Array<{ ms: number; values: Float32Array; bound: number }>;
  smallKernelMs: number;
  forwardTokensPerS: number;
}

function measure(backend: string): Measured {
  const matmul = SHAPES.map(([M, K, N]) => {
    const a = tf.randomUniform([M, K], -1, 1, "float32", 1);
    const b = tf.randomUniform([K, N], -1, 1, "float32", 2);
    const r = timed(() => tf.matMul(a, b));
    const bound = K * 2 ** -24 * K; // |a·b| ≤ 1 a term
    tf.dispose([a, b]);
    return { ...r, bound };
  });
  const x = tf.randomUniform([64, 64], -1, 1, "float32", 3);
  const small: number[] = [];
  for (let i = 0; i < 50; i++) {
    const t0 = performance.now();
    const y = tf.add(x, i);
    y.dataSync();
    small.push(performance.now() - t0);
    y.dispose();
  }
  x.dispose();
  const model = loadModelSync("fixtures/models/stories260k");
  const ids = Array.from({ length: 128 }, (_, i) => 1 + ((i * 37) % 500));
  const at = ids.map((_, t) => [0, t] as [number, number]);
  const targets = [...ids.slice(1), 2];
  const runs: number[] = [];
  for (let r = 0; r <= REPS; r++) {
    const t0 = performance.now();
    forward(model, [ids], { logitsAt: at, targets }).dispose();
    if (r > 0) runs.push(performance.now() - t0);
  }
  disposeModel(model);
  return { backend, matmul, smallKernelMs: median(small), forwardTokensPerS: (1000 * ids.length) / median(runs) };
}

const results: Measured[] = [];
for (const name of nativeStatus().ok ? ["wasm", "native", "webgpu"] : ["wasm", "webgpu"])
  results.push(measure(await initBackend(name)));

const [wasm] = results;
console.log(`measured ${new Date().toISOString().slice(0, 10)}; ratios are against ${wasm!.backend}`);
for (const r of results) {
  console.log(`\n${r.backend}`);
  SHAPES.forEach(([M, K, N], i) => {
    const m = r.matmul[i]!;
    const gflops = (2 * M * K * N) / m.ms / 1e6;
    const ratio = wasm!.matmul[i]!.ms / m.ms;
    let diff = 0;
    for (let j = 0; j < m.values.length; j++)
      diff = Math.max(diff, Math.abs(m.values[j]! - wasm!.matmul[i]!.values[j]!));
    console.log(
      `  matmul [${M}, ${K}]·[${K}, ${N}]: ${m.ms.toFixed(1)} ms, ${gflops.toFixed(1)} GFLOP/s, ${ratio.toFixed(2)}x wasm's speed; max |Δ| vs wasm ${diff.toExponential(1)} (${(diff / m.bound).toFixed(3)} of the float32 bound)`,
    );
  });
  console.log(
    `  a [64, 64] add and its read back: ${r.smallKernelMs.toFixed(3)} ms (${(wasm!.smallKernelMs / r.smallKernelMs).toFixed(2)}x wasm's speed)`,
  );
  console.log(
    `  stories260k forward, 1 row of 128 tokens with log-probabilities: ${r.forwardTokensPerS.toFixed(0)} tokens/s (${(r.forwardTokensPerS / wasm!.forwardTokensPerS).toFixed(2)}x wasm's speed)`,
  );
}
