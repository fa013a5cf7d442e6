// Picks the tfjs backend: tfjs-node-gpu, then tfjs-node when the user has installed them, else wasm, else cpu.
import * as tf from "@tensorflow/tfjs-core";

/** Backend names a user can ask for. */
export const BACKENDS = ["tensorflow-gpu", "tensorflow", "wasm", "cpu"] as const;
export type BackendName = (typeof BACKENDS)[number];

/** A backend that was asked for but cannot be used here. */
export class BackendError extends Error {
  override name = "BackendError";
}

const PACKAGES: Record<BackendName, string> = {
  "tensorflow-gpu": "@tensorflow/tfjs-node-gpu",
  tensorflow: "@tensorflow/tfjs-node",
  wasm: "@tensorflow/tfjs-backend-wasm",
  cpu: "@tensorflow/tfjs-backend-cpu",
};

/**
 * The wasm backend reports an XNNPACK failure (e.g. status 6, out of memory) only as a console message and
 * carries on with an unwritten output: wrong numbers, silently. Its messages are watched for, and the forward
 * pass turns one into an error (takeBackendFault).
 */
let fault: string | null = null;
let watching = false;
function watchBackendMessages(): void {
  if (watching) return;
  watching = true;
  const warn = console.warn.bind(console);
  console.warn = (...args: unknown[]) => {
    const text = args.map(String).join(" ");
    if (/XNN status .* is not successful/.test(text)) fault ??= text.trim();
    else warn(...args);
  };
  const error = console.error.bind(console);
  console.error = (...args: unknown[]) => {
    // emscripten prints "Aborted()" before the RuntimeError that explainBackendError rewrites
    if (args.length === 1 && String(args[0]).trim() === "Aborted()") return;
    error(...args);
  };
}

/** The wasm backend's heap in use now (its linear memory only grows), in bytes; null on other backends. */
export function wasmHeapBytes(): number | null {
  const b = tf.getBackend() === "wasm" ? (tf.backend() as unknown as { wasm?: { HEAPU8?: Uint8Array } }) : null;
  return b?.wasm?.HEAPU8?.length ?? null;
}

/**
 * An error of the wasm runtime running out of its 4 GiB heap ("memory access out of bounds", an abort) as a
 * sentence that says so and what to lower; any other error unchanged.
 */
export function explainBackendError(e: unknown): unknown {
  const msg = e instanceof Error ? e.message : String(e);
  if (!/memory access out of bounds|^Aborted|Out of memory|Cannot enlarge memory|XNN status 6/i.test(msg)) return e;
  const heap = wasmHeapBytes();
  const used = heap === null ? "" : ` (${(heap / 2 ** 30).toFixed(2)} GiB in use)`;
  return new BackendError(`the wasm backend ran out of its 4 GiB heap${used}: lower --memory-budget, --batch or --max-tokens, or install @tensorflow/tfjs-node (${msg.split("\n")[0]})`);
}

/** The backend failure seen since the last call (and clears it), or null. */
export function takeBackendFault(): string | null {
  const f = fault;
  fault = null;
  return f;
}

async function tryBackend(name: BackendName): Promise<string | null> {
  try {
    await import(PACKAGES[name]);
  } catch {
    return null;
  }
  const registered = name === "tensorflow-gpu" ? "tensorflow" : name;
  try {
    if (!(await tf.setBackend(registered))) return null;
    await tf.ready();
  } catch {
    return null;
  }
  return registered;
}

/**
 * Sets the best available backend (or the one asked for) and returns a description like "wasm (SIMD)".
 * Throws BackendError when a forced backend is not installed.
 */
export async function initBackend(force?: string): Promise<string> {
  // Production mode silences tfjs's own console advice (we report the backend ourselves).
  tf.env().set("PROD", true);
  watchBackendMessages();
  if (force !== undefined) {
    if (!(BACKENDS as readonly string[]).includes(force)) throw new BackendError(`unknown backend "${force}" (choose from ${BACKENDS.join(", ")})`);
    const got = await tryBackend(force as BackendName);
    if (!got) throw new BackendError(`backend "${force}" is not available: install ${PACKAGES[force as BackendName]}`);
    return await describeBackend(force as BackendName);
  }
  for (const name of BACKENDS) if (await tryBackend(name)) return await describeBackend(name);
  throw new BackendError("no tfjs backend could be started");
}

async function describeBackend(name: BackendName): Promise<string> {
  if (name !== "wasm") return name;
  const simd = await tf.env().getAsync("WASM_HAS_SIMD_SUPPORT").catch(() => false);
  return simd ? "wasm (SIMD)" : "wasm (no SIMD)";
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
