// Picks the tfjs backend: tfjs-node-gpu when the user has installed it, then webgpu on a hardware GPU (Dawn's
// Node bindings; never a software renderer unless asked for), then tfjs-node when installed, else native (wasm
// with the BLAS matmul of native/, when it is built), else wasm, else cpu.
import * as tf from "@tensorflow/tfjs-core";
import { nativeMatMulActive, nativeStatus, nativeThreads, useNativeKernels } from "./native.js";
import type { AdapterChoice } from "./webgpu.js";

/** Backend names a user can ask for, best first. */
export const BACKENDS = ["tensorflow-gpu", "webgpu", "tensorflow", "native", "wasm", "cpu"] as const;
export type BackendName = (typeof BACKENDS)[number];

/** The environment variable that picks the backend when none is asked for (as --backend does). */
export const BACKEND_ENV = "PREFPROBE_BACKEND";

/**
 * The environment variable that lets an asked-for webgpu backend take a software adapter: "software" starts it on
 * Dawn's OpenGL ES backend, which without a GPU is Mesa's llvmpipe (CI's GPU path); "hardware" (the default)
 * takes only a real GPU. Auto-detection takes only a real GPU whatever it says.
 */
export const WEBGPU_ENV = "PREFPROBE_WEBGPU";

/** A backend that was asked for but cannot be used here. */
export class BackendError extends Error {
  override name = "BackendError";
}

const PACKAGES: Record<BackendName, string> = {
  "tensorflow-gpu": "@tensorflow/tfjs-node-gpu",
  webgpu: "@tensorflow/tfjs-backend-webgpu",
  tensorflow: "@tensorflow/tfjs-node",
  native: "@tensorflow/tfjs-backend-wasm",
  wasm: "@tensorflow/tfjs-backend-wasm",
  cpu: "@tensorflow/tfjs-backend-cpu",
};

/**
 * The wasm backend reports an XNNPACK failure (e.g. status 6, out of memory) only as a message on stderr and
 * carries on with an unwritten output: wrong numbers, silently. Its runtime binds its stderr printer to
 * console.warn when its module is made, so console.warn is this filter only while the backend starts
 * (startBackend) and the process's own again afterwards; the module keeps the filter. A fault is held for the
 * forward pass, which turns it into an error (takeBackendFault).
 */
let fault: string | null = null;

/**
 * What the wasm runtime printed to stderr: an XNNPACK failure is held as the fault, emscripten's "Aborted()" (which
 * comes before the RuntimeError that explainBackendError rewrites) dropped; returns whether to print the line.
 */
export function noteBackendMessage(text: string): boolean {
  if (/XNN status .* is not successful/.test(text)) fault ??= text.trim();
  else if (!/^Aborted\(.*\)$/.test(text.trim())) return true;
  return false;
}

/** Runs `start` with console.warn as the runtime's filtered stderr, then gives console.warn back. */
async function withStderrFilter<T>(start: () => Promise<T>): Promise<T> {
  const own = console.warn;
  console.warn = (...args: unknown[]) => {
    if (noteBackendMessage(args.map(String).join(" "))) own.apply(console, args);
  };
  try {
    return await start();
  } finally {
    console.warn = own;
  }
}

/** This thread's backend by the names of BACKENDS ("native" is the wasm backend with the native matmul); null before one starts. */
export function backendKind(): BackendName | null {
  const current = (tf.engine() as unknown as { backendName: string | null }).backendName;
  if (!current) return null;
  if (current === "wasm") return nativeMatMulActive() ? "native" : "wasm";
  return current === "tensorflow" || current === "cpu" || current === "webgpu" ? current : null;
}

/**
 * Whether a backend (a name, or initBackend's description, which starts with it) keeps tensors in a wasm heap of
 * at most 4 GiB: wasm, and native, which is wasm with a BLAS matmul.
 */
export const usesWasmHeap = (backend: string | null = backendKind()): boolean =>
  !!backend && /^(wasm|native)\b/.test(backend);

/** The wasm backend's heap in use now (its linear memory only grows), in bytes; null on other backends. */
export function wasmHeapBytes(): number | null {
  const b = usesWasmHeap() ? (tf.backend() as unknown as { wasm?: { HEAPU8?: Uint8Array } }) : null;
  return b?.wasm?.HEAPU8?.length ?? null;
}

/**
 * An error of the wasm runtime running out of its 4 GiB heap ("memory access out of bounds", an abort) as a
 * sentence that says so and what to lower; any other error unchanged.
 */
export function explainBackendError(e: unknown): unknown {
  const msg = e instanceof Error ? e.message : String(e);
  // on webgpu the heap is the GPU's, and its own errors say what failed
  if (backendKind() === "webgpu")
    return /out of ?memory/i.test(msg)
      ? new BackendError(
          `the GPU ran out of memory: a smaller memoryBudget, batchPairs or maxTokens needs less (${msg.split("\n")[0]})`,
        )
      : e;
  if (!/memory access out of bounds|^Aborted|Out of memory|Cannot enlarge memory|XNN status 6/i.test(msg)) return e;
  const heap = wasmHeapBytes();
  const used = heap === null ? "" : ` (${(heap / 2 ** 30).toFixed(2)} GiB in use)`;
  return new BackendError(
    `the wasm backend ran out of its 4 GiB heap${used}: a smaller memoryBudget, batchPairs or maxTokens needs less, as does the native matmul (${msg.split("\n")[0]})`,
  );
}

/** The backend failure seen since the last call (and clears it), or null. */
export function takeBackendFault(): string | null {
  const f = fault;
  fault = null;
  return f;
}

/**
 * Runs `start` and takes back the process-wide 'uncaughtException' / 'unhandledRejection' handlers it added:
 * emscripten's (the wasm backend's runtime) rethrow from inside its minified source, so any error a user's script
 * throws later would print tens of KB of that source and exit with its code instead of the user's message.
 */
async function withoutProcessHandlers<T>(start: () => Promise<T>): Promise<T> {
  const events = ["uncaughtException", "unhandledRejection"];
  const listeners = (e: string) => process.listeners(e as "uncaughtException") as Array<(...a: unknown[]) => void>;
  const before = events.map((e) => new Set(listeners(e)));
  try {
    return await start();
  } finally {
    events.forEach((e, i) => {
      for (const l of listeners(e)) if (!before[i]!.has(l)) process.removeListener(e, l);
    });
  }
}

/** How a start went: a webgpu start's description of its adapter, or why a backend cannot start (when known). */
type Started = { ok: true; description?: string } | { ok: false; why?: string };

async function tryBackend(name: BackendName, opts: BackendOptions, auto: boolean): Promise<Started> {
  return withoutProcessHandlers(() => startBackend(name, opts, auto));
}

async function startBackend(name: BackendName, opts: BackendOptions, auto: boolean): Promise<Started> {
  if (name === "webgpu") return startWebgpuBackend(opts, auto);
  if (name === "native" && !nativeStatus().ok) return { ok: false };
  try {
    await import(PACKAGES[name]);
  } catch {
    return { ok: false };
  }
  const registered = name === "tensorflow-gpu" ? "tensorflow" : name === "native" ? "wasm" : name;
  try {
    const started = await withStderrFilter(async () => {
      if (!(await tf.setBackend(registered))) return false;
      await tf.ready();
      return true;
    });
    if (!started) return { ok: false };
  } catch {
    return { ok: false };
  }
  if (registered === "wasm") useNativeKernels(name === "native", opts.threads);
  return { ok: true };
}

/** The adapters an asked-for webgpu backend may take: opts.webgpuAdapter, else PREFPROBE_WEBGPU, else "hardware". */
function webgpuChoice(opts: BackendOptions): AdapterChoice {
  if (opts.webgpuAdapter) return opts.webgpuAdapter;
  const v = process.env[WEBGPU_ENV] || "hardware";
  if (v !== "hardware" && v !== "software")
    throw new BackendError(`unknown ${WEBGPU_ENV} "${v}" (choose hardware or software)`);
  return v;
}

/**
 * webgpu (src/model/webgpu.ts, loaded only here). Auto-detection takes a hardware GPU only, and probes only where
 * the event-loop addon that every webgpu read needs is built (it also keeps Dawn's probing off stderr).
 */
async function startWebgpuBackend(opts: BackendOptions, auto: boolean): Promise<Started> {
  const adapter = auto ? "hardware" : webgpuChoice(opts);
  const gpu = await import("./webgpu.js");
  if (auto && !gpu.loopAvailable()) return { ok: false };
  const r = await gpu.startWebgpu({
    adapter,
    noteFault: (m) => void (fault ??= m),
    takeFault: takeBackendFault,
  });
  if (r.ok) return { ok: true, description: r.description };
  const hint = r.softwareMightDo
    ? `; ${WEBGPU_ENV}=software takes a software adapter (Mesa's llvmpipe where there is no GPU)`
    : "";
  return { ok: false, why: r.why + hint };
}

/** How a backend is started. */
export interface BackendOptions {
  /**
   * Threads each call of the native matmul may use (its numbers do not depend on them). Default: one per core;
   * a run on several worker threads gives each its share of the cores.
   */
  threads?: number;
  /**
   * The adapters an asked-for webgpu backend may take: "hardware" (a real GPU) or "software" (Dawn's OpenGL ES
   * backend, Mesa's llvmpipe where there is no GPU). Default: PREFPROBE_WEBGPU, else "hardware". Auto-detection
   * never takes a software adapter. A run's worker threads read PREFPROBE_WEBGPU.
   */
  webgpuAdapter?: AdapterChoice;
}

/**
 * Sets the backend asked for (else the one PREFPROBE_BACKEND names, else the best available) and returns a
 * description like "native (OpenBLAS …, 2 threads)" or "webgpu (the adapter's name, …)". A wasm backend picked
 * because the native matmul is not built says why and how to get it. Throws BackendError when a backend asked
 * for cannot be started.
 */
export async function initBackend(force?: string, opts: BackendOptions = {}): Promise<string> {
  // Production mode silences tfjs's own console advice (we report the backend ourselves).
  tf.env().set("PROD", true);
  const asked = force ?? (process.env[BACKEND_ENV] || undefined);
  const from = force === undefined && asked !== undefined ? ` (from ${BACKEND_ENV})` : "";
  if (asked !== undefined) {
    if (!(BACKENDS as readonly string[]).includes(asked))
      throw new BackendError(`unknown backend "${asked}"${from} (choose from ${BACKENDS.join(", ")})`);
    const name = asked as BackendName;
    const started = await tryBackend(name, opts, false);
    if (!started.ok) {
      const status = nativeStatus();
      const why =
        started.why ??
        (name === "native" && !status.ok
          ? `the native matmul is not available here: ${status.why}`
          : `install ${PACKAGES[name]}`);
      throw new BackendError(`backend "${name}"${from} is not available: ${why}`);
    }
    return await describeBackend(name, started, false);
  }
  for (const name of BACKENDS) {
    const started = await tryBackend(name, opts, true);
    if (started.ok) return await describeBackend(name, started, true);
  }
  throw new BackendError("no tfjs backend could be started");
}

async function describeBackend(name: BackendName, started: Started, auto: boolean): Promise<string> {
  if (name === "webgpu") return (started.ok && started.description) || name;
  if (name === "native") {
    const threads = nativeThreads() ?? 1;
    const status = nativeStatus();
    const blas = status.ok ? status.blas.split(" ").slice(0, 2).join(" ") : "a BLAS";
    return `native (wasm with the ${blas} matmul, ${threads} thread${threads > 1 ? "s" : ""} a call)`;
  }
  if (name !== "wasm") return name;
  const simd = await tf
    .env()
    .getAsync("WASM_HAS_SIMD_SUPPORT")
    .catch(() => false);
  const status = nativeStatus();
  const why = auto && !status.ok ? `; the faster native matmul is not used: ${status.why}` : "";
  return (simd ? "wasm (SIMD)" : "wasm (no SIMD)") + why;
}

/**
 * The most bytes one tensor may take on the current backend: on webgpu a buffer larger than the device's
 * maxStorageBufferBindingSize cannot be bound to a kernel (128 MiB on llvmpipe; a 128k-vocabulary head at
 * hidden 2048 is 1 GiB), nor one above maxBufferSize made; elsewhere no limit.
 */
export function maxTensorBytes(): number {
  if (tf.getBackend() !== "webgpu") return Infinity;
  const limits = (tf.backend() as unknown as { device?: { limits?: Record<string, number> } }).device?.limits ?? {};
  return Math.min(limits.maxStorageBufferBindingSize ?? Infinity, limits.maxBufferSize ?? Infinity);
}

/** The backend in use, starting the best available one (as initBackend) when none has been started yet. */
export async function ensureBackend(): Promise<string> {
  const current = (tf.engine() as unknown as { backendName: string | null }).backendName;
  if (current) return current;
  return await initBackend();
}

/**
 * A new float32 tensor of `shape` whose values `fill` writes: on wasm straight into the backend's heap, so a
 * streamed 1B layer's matrices never pass through a Node-side copy; elsewhere through a new array.
 */
export function filledTensor(shape: number[], fill: (out: Float32Array) => void): tf.Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const b = tf.backend() as unknown as {
    makeOutput?: (shape: number[], dtype: "float32") => tf.TensorInfo;
    typedArrayFromHeap?: (info: tf.TensorInfo) => Float32Array;
  };
  if (tf.getBackend() === "wasm" && b.makeOutput && b.typedArrayFromHeap) {
    const info = b.makeOutput(shape, "float32"); // allocated, not written
    try {
      fill(b.typedArrayFromHeap(info)); // a view of the heap: valid while nothing allocates, and fill does not
    } catch (e) {
      tf.backend().disposeData(info.dataId); // not yet a tensor, so nothing else would free it
      throw e;
    }
    return tf.engine().makeTensorFromTensorInfo(info);
  }
  const out = new Float32Array(n);
  fill(out);
  return tf.tensor(out, shape, "float32");
}
