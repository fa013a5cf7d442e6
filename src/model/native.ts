// The native matmul: native/blas.c (built by `npm ci` when a C compiler and OpenBLAS or Accelerate are there)
// multiplies float32 tensors of the wasm heap in place with the machine's BLAS, and a streamed model's stored
// weights (BF16, F16 or F32 bytes outside the heap) where they lie. It replaces the wasm backend's BatchMatMul
// kernel, so every tf.matMul on wasm (and its gradients) runs on it; the "native" backend is wasm with it.
import * as fs from "node:fs";
import * as os from "node:os";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import * as tf from "@tensorflow/tfjs-core";

/** The addon's functions (native/blas.c). */
interface BlasAddon {
  matmul(
    M: number,
    N: number,
    K: number,
    a: Uint8Array,
    aOffsets: Float64Array,
    transA: boolean,
    b: Uint8Array,
    bOffsets: Float64Array,
    transB: boolean,
    bDtype: number,
    c: Uint8Array,
    cOffsets: Float64Array,
    threads: number,
  ): void;
  describe(): string;
  lse(x: Uint8Array, offset: number, rows: number, cols: number, out: Float32Array): void;
}

/** Stored dtypes the kernel reads as its B operand. */
const DTYPE_CODE = { F32: 0, BF16: 1, F16: 2 } as const;
export type StoredDType = keyof typeof DTYPE_CODE;

/**
 * A weight matrix left in its stored bytes (Hugging Face layout [out, in], row-major) outside the backend: the
 * native kernel multiplies by it where it lies, widening BF16/F16 a cache-sized block at a time.
 */
export class StoredMatrix {
  constructor(
    /** The stored values (a view, possibly of a SharedArrayBuffer that other threads read too). */
    readonly bytes: Uint8Array,
    readonly dtype: StoredDType,
    /** Output features (rows as stored). */
    readonly rows: number,
    /** Input features (columns as stored). */
    readonly cols: number,
  ) {
    const need = rows * cols * (dtype === "F32" ? 4 : 2);
    if (bytes.byteLength !== need)
      throw new RangeError(`a stored ${dtype} [${rows}, ${cols}] matrix needs ${need} bytes, got ${bytes.byteLength}`);
  }
}

const ADDON = "native/build/Release/prefprobe_blas.node";
/** Written by scripts/build-native.mjs when the build fails: the reason, in one line. */
const BUILD_NOTE = "native/build-failed.txt";

/** The package root (holds native/): two folders above src/model, three above dist/src/model. */
export function packageRoot(): string {
  const here = fileURLToPath(new URL(".", import.meta.url));
  for (const up of ["../..", "../../.."]) {
    const root = fileURLToPath(new URL(up + "/", `file://${here}`));
    if (fs.existsSync(`${root}native/blas.c`)) return root;
  }
  return fileURLToPath(new URL("../../", `file://${here}`));
}

/** The first line of a build note the install left (native/*-failed.txt), or "it has not been built". */
export function buildNote(root: string, note: string): string {
  return fs.existsSync(root + note)
    ? fs
        .readFileSync(root + note, "utf8")
        .trim()
        .split("\n")[0]!
    : "it has not been built";
}

let loaded: { addon: BlasAddon | null; why: string } | null = null;

/** The addon, loaded once per thread, and why not when it cannot be. */
function load(): { addon: BlasAddon | null; why: string } {
  if (loaded) return loaded;
  const root = packageRoot();
  const file = root + ADDON;
  if (!fs.existsSync(file)) {
    const note = buildNote(root, BUILD_NOTE);
    return (loaded = {
      addon: null,
      why: `${note}; install OpenBLAS (apt-get install libopenblas-dev; macOS has Accelerate) and a C compiler, then run npm run build:native`,
    });
  }
  try {
    return (loaded = { addon: createRequire(import.meta.url)(file) as BlasAddon, why: "" });
  } catch (e) {
    const msg = (e as Error).message.split("\n")[0];
    return (loaded = { addon: null, why: `${ADDON} does not load (${msg}); rebuild it with npm run build:native` });
  }
}

/** Whether the native kernel is built and loads here; else why not, and how to get it. */
export function nativeStatus(): { ok: true; blas: string } | { ok: false; why: string } {
  const { addon, why } = load();
  return addon ? { ok: true, blas: addon.describe() } : { ok: false, why };
}

function addon(): BlasAddon {
  const a = load().addon;
  if (!a) throw new Error(`the native matmul is not available: ${load().why}`);
  return a;
}

// --- the wasm backend's internals the kernel uses (tfjs-backend-wasm 4.x: BackendWasm) ---
interface WasmBackend {
  wasm: { HEAPU8: Uint8Array };
  dataIdMap: { get(id: tf.DataId): { memoryOffset: number } };
  makeOutput(shape: number[], dtype: "float32"): tf.TensorInfo;
  disposeData(id: tf.DataId): void;
}
const offsetOf = (b: WasmBackend, t: tf.TensorInfo) => b.dataIdMap.get(t.dataId).memoryOffset;

/**
 * Byte offsets of each output batch entry's A and B blocks under numpy-style broadcasting of the leading dims
 * (the stock kernel handles only a batch of 1 against n), and the output's leading shape.
 */
export function broadcastOffsets(
  aLead: number[],
  bLead: number[],
  aBlock: number,
  bBlock: number,
): { lead: number[]; a: Float64Array; b: Float64Array } {
  const lead = tf.broadcast_util.assertAndGetBroadcastShape(aLead, bLead);
  const n = lead.reduce((x, y) => x * y, 1);
  const a = new Float64Array(n);
  const b = new Float64Array(n);
  const r = lead.length;
  const pa = [...new Array(r - aLead.length).fill(1), ...aLead];
  const pb = [...new Array(r - bLead.length).fill(1), ...bLead];
  for (let i = 0; i < n; i++) {
    let rest = i;
    let ia = 0;
    let ib = 0;
    let sa = 1;
    let sb = 1;
    for (let d = r - 1; d >= 0; d--) {
      const idx = rest % lead[d]!;
      rest = Math.floor(rest / lead[d]!);
      if (pa[d]! > 1) ia += idx * sa;
      if (pb[d]! > 1) ib += idx * sb;
      sa *= pa[d]!;
      sb *= pb[d]!;
    }
    a[i] = ia * aBlock;
    b[i] = ib * bBlock;
  }
  return { lead, a, b };
}

type KernelArgs = { inputs: tf.NamedTensorInfoMap; attrs?: tf.NamedAttrMap; backend: unknown };

/** The BatchMatMul kernel on the native matmul: C = op(A) · op(B) over broadcast leading dims, on `threads` threads. */
const batchMatMul =
  (threads: number) =>
  ({ inputs, attrs, backend }: KernelArgs): tf.TensorInfo => {
    const { a, b } = inputs as { a: tf.TensorInfo; b: tf.TensorInfo };
    const { transposeA, transposeB } = attrs as unknown as { transposeA: boolean; transposeB: boolean };
    if (a.dtype !== "float32" || b.dtype !== "float32")
      throw new Error("BatchMatMul for non-float32 tensors is not supported");
    const be = backend as WasmBackend;
    const [ra, rb] = [a.shape.length, b.shape.length];
    if (ra < 2 || rb < 2) throw new Error(`BatchMatMul needs rank ≥ 2 operands, got [${a.shape}] and [${b.shape}]`);
    const M = transposeA ? a.shape[ra - 1]! : a.shape[ra - 2]!;
    const K = transposeA ? a.shape[ra - 2]! : a.shape[ra - 1]!;
    const Kb = transposeB ? b.shape[rb - 1]! : b.shape[rb - 2]!;
    const N = transposeB ? b.shape[rb - 2]! : b.shape[rb - 1]!;
    if (K !== Kb)
      throw new Error(
        `Error in matMul: inner shapes (${K}) and (${Kb}) of Tensors with shapes ${a.shape} and ${b.shape} and transposeA=${transposeA} and transposeB=${transposeB} must match.`,
      );
    const { lead, a: ao, b: bo } = broadcastOffsets(a.shape.slice(0, -2), b.shape.slice(0, -2), 4 * M * K, 4 * K * N);
    const out = be.makeOutput([...lead, M, N], "float32");
    const co = Float64Array.from(ao, (_, i) => i * 4 * M * N);
    for (let i = 0; i < ao.length; i++) {
      ao[i]! += offsetOf(be, a);
      bo[i]! += offsetOf(be, b);
      co[i]! += offsetOf(be, out);
    }
    const heap = be.wasm.HEAPU8; // read after makeOutput: an allocation that grows the heap replaces its buffer
    addon().matmul(M, N, K, heap, ao, transposeA, heap, bo, transposeB, DTYPE_CODE.F32, heap, co, threads);
    return out;
  };

/** The kernel that multiplies by a StoredMatrix: x [M, K] · Wᵀ → [M, rows] (or with `transposed`, x [M, rows] · W → [M, cols]). */
const STORED_MATMUL = "PrefprobeStoredMatMul";

const storedKernel =
  (threads: number) =>
  ({ inputs, attrs, backend }: KernelArgs): tf.TensorInfo => {
    const x = (inputs as { x: tf.TensorInfo }).x;
    const { matrix: w, transposed } = attrs as unknown as { matrix: StoredMatrix; transposed: boolean };
    const be = backend as WasmBackend;
    const [M, K] = x.shape as [number, number];
    const N = transposed ? w.cols : w.rows;
    if (K !== (transposed ? w.rows : w.cols))
      throw new Error(
        `stored matmul: x [${x.shape}] against a [${w.rows}, ${w.cols}] matrix${transposed ? " (transposed)" : ""}`,
      );
    const out = be.makeOutput([M, N], "float32");
    const heap = be.wasm.HEAPU8;
    const one = (o: number) => Float64Array.of(o);
    // y = x · Wᵀ reads W [rows, cols] transposed; x · W reads it as stored
    addon().matmul(
      M,
      N,
      K,
      heap,
      one(offsetOf(be, x)),
      false,
      w.bytes,
      one(0),
      !transposed,
      DTYPE_CODE[w.dtype],
      heap,
      one(offsetOf(be, out)),
      threads,
    );
    return out;
  };

/**
 * x [..., K] · Wᵀ for a stored matrix W [N, K] → [..., N] (with `transposed`, x [..., N] · W → [..., K]), by the
 * native kernel (useNativeKernels(true) registers it); differentiable in x.
 */
export function storedMatMul(x: tf.Tensor, w: StoredMatrix, transposed = false): tf.Tensor {
  if (!tf.getKernel(STORED_MATMUL, "wasm")) registerStored(os.availableParallelism());
  const lead = x.shape.slice(0, -1);
  return tf.tidy(() => {
    const flat = tf.reshape(x, [-1, x.shape[x.shape.length - 1]!]);
    const y = tf
      .engine()
      .runKernel(STORED_MATMUL, { x: flat }, { matrix: w, transposed } as unknown as tf.NamedAttrMap) as tf.Tensor;
    return tf.reshape(y, [...lead, transposed ? w.cols : w.rows]);
  });
}

/** Marks this module's kernels (their thread count) among whatever the registry holds. */
const THREADS = Symbol("prefprobe native threads");
type Marked = tf.KernelFunc & { [THREADS]?: number };
const marked = (f: (a: KernelArgs) => tf.TensorInfo, threads: number): tf.KernelFunc =>
  Object.assign(f as unknown as tf.KernelFunc, { [THREADS]: threads });

/**
 * GatherV2 by row copies in the heap (axis any, batchDims 0, 4-byte values): the stock wasm kernel copies element
 * by element, which took 13% of a 1B pair's thread time in the packed rows' gathers. Out-of-range indices throw.
 */
const gather =
  (fallback: tf.KernelConfig | undefined) =>
  (args: KernelArgs): tf.TensorInfo => {
    const { inputs, attrs, backend } = args;
    const { x, indices } = inputs as { x: tf.TensorInfo; indices: tf.TensorInfo };
    const { axis, batchDims } = attrs as unknown as { axis: number; batchDims: number };
    if (batchDims || (x.dtype !== "float32" && x.dtype !== "int32") || indices.dtype !== "int32") {
      if (!fallback)
        throw new Error(
          `GatherV2 of ${x.dtype} by ${indices.dtype} indices with batchDims ${batchDims} is not supported`,
        );
      return (fallback.kernelFunc as unknown as (a: KernelArgs) => tf.TensorInfo)(args);
    }
    const be = backend as WasmBackend;
    const ax = tf.util.parseAxisParam(axis, x.shape)[0]!;
    const size = (s: number[]) => s.reduce((p, q) => p * q, 1);
    const [outer, n, inner] = [size(x.shape.slice(0, ax)), x.shape[ax]!, size(x.shape.slice(ax + 1))];
    const m = size(indices.shape);
    const out = be.makeOutput(
      [...x.shape.slice(0, ax), ...indices.shape, ...x.shape.slice(ax + 1)],
      x.dtype as "float32",
    );
    const heap = new Int32Array(be.wasm.HEAPU8.buffer); // after makeOutput, which may grow the heap
    const [xo, io, oo] = [offsetOf(be, x) / 4, offsetOf(be, indices) / 4, offsetOf(be, out) / 4];
    for (let i = 0; i < m; i++) {
      const idx = heap[io + i]!;
      if (!(idx >= 0 && idx < n)) {
        be.disposeData(out.dataId);
        throw new RangeError(`gather index ${idx} is outside [0, ${n})`);
      }
    }
    for (let o = 0; o < outer; o++)
      for (let i = 0; i < m; i++) {
        const from = xo + (o * n + heap[io + i]!) * inner;
        const to = oo + (o * m + i) * inner;
        if (inner === 1) heap[to] = heap[from]!;
        else heap.copyWithin(to, from, from + inner);
      }
    return out;
  };

/**
 * log Σ exp(x) along the last axis of x [rows, cols] → [rows]: by the native kernel in one pass per row (its max,
 * then the sum of exp(x − max) in double) when the native kernels run, else tf.logSumExp.
 */
export function rowLogSumExp(x: tf.Tensor2D): tf.Tensor1D {
  if (!nativeMatMulActive()) return tf.logSumExp(x, 1);
  const be = tf.backend() as unknown as WasmBackend;
  const [rows, cols] = x.shape;
  const out = new Float32Array(rows);
  addon().lse(be.wasm.HEAPU8, offsetOf(be, x), rows, cols, out);
  return tf.tensor1d(out);
}

/** The stock kernels, kept to put back (useNativeKernels(false)). */
let stock: tf.KernelConfig | null = null;
let stockGather: tf.KernelConfig | null = null;

/**
 * Makes tf.matMul on the wasm backend run on the native kernel (true), with up to `threads` threads per call, and
 * tf.gather on row copies; or both on wasm's own kernels (false). The numbers do not depend on `threads`. The wasm backend must be the current one.
 * Throws when `on` and the kernel is not built here.
 */
export function useNativeKernels(on: boolean, threads = os.availableParallelism()): void {
  if (tf.getBackend() !== "wasm")
    throw new Error("the native matmul runs on the wasm backend's heap: start the wasm backend first");
  if (on) addon();
  if (!(Number.isInteger(threads) && threads >= 1))
    throw new RangeError(`native matmul threads must be an integer ≥ 1, got ${threads}`);
  const current = tf.getKernel("BatchMatMul", "wasm");
  if (nativeThreads() === null) {
    stock ??= current ?? null;
    stockGather ??= tf.getKernel("GatherV2", "wasm") ?? null;
  }
  for (const name of ["BatchMatMul", "GatherV2"]) if (tf.getKernel(name, "wasm")) tf.unregisterKernel(name, "wasm");
  if (!on) {
    for (const k of [stock, stockGather]) if (k) tf.registerKernel(k);
    return;
  }
  tf.registerKernel({
    kernelName: "BatchMatMul",
    backendName: "wasm",
    kernelFunc: marked(batchMatMul(threads), threads),
  });
  tf.registerKernel({
    kernelName: "GatherV2",
    backendName: "wasm",
    kernelFunc: gather(stockGather ?? undefined) as unknown as tf.KernelFunc,
  });
  registerStored(threads);
}

/**
 * Registers the stored-matrix kernel with up to `threads` threads a call. useNativeKernels(true) does; a model read
 * in place on the stock wasm matmul (for tests of both) gets it with one thread per core at its first product.
 */
function registerStored(threads: number): void {
  if (tf.getKernel(STORED_MATMUL, "wasm")) tf.unregisterKernel(STORED_MATMUL, "wasm");
  tf.registerKernel({
    kernelName: STORED_MATMUL,
    backendName: "wasm",
    kernelFunc: marked(storedKernel(threads), threads),
  });
  if (!tf.getGradient(STORED_MATMUL)) {
    tf.registerGradient({
      kernelName: STORED_MATMUL,
      gradFunc: (dy, _saved, attrs) => {
        const { matrix, transposed: t } = attrs as unknown as { matrix: StoredMatrix; transposed: boolean };
        return { x: () => storedMatMul(dy as tf.Tensor, matrix, !t) };
      },
    });
  }
}

/** The native kernel's threads per call when tf.matMul runs on it now, else null. */
export function nativeThreads(): number | null {
  if (tf.getBackend() !== "wasm") return null;
  return (tf.getKernel("BatchMatMul", "wasm")?.kernelFunc as Marked | undefined)?.[THREADS] ?? null;
}

/** Whether tf.matMul runs on the native kernel now. */
export const nativeMatMulActive = (): boolean => nativeThreads() !== null;
