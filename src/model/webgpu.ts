// The webgpu backend: @tensorflow/tfjs-backend-webgpu on Dawn's Node bindings (npm `webgpu`, which ships a
// prebuilt dawn.node per platform, so `npm ci` installs it with no download). Node lacks two things the backend
// expects of a browser: navigator.gpu, which this file provides (choosing the adapter, as tfjs passes no options
// that could), and a synchronous read of a GPU buffer. tfjs's own readSync draws through an OffscreenCanvas, which
// Node does not have, and prefprobe reads tensors synchronously (dataSync) throughout, so readSync is replaced:
// the tensor's buffer is copied into a mappable one, and the read waits for the mapping by running libuv's ready
// callbacks from inside the call (native/loop.c), which is where Dawn settles a mapping. backend.ts imports this
// file only when webgpu is asked for or auto-detection probes for a GPU.
import * as fs from "node:fs";
import { createRequire } from "node:module";
import * as tf from "@tensorflow/tfjs-core";
import { buildNote, packageRoot } from "./native.js";

/** Which adapters a start accepts: a hardware GPU only, or any adapter of Dawn's OpenGL ES backend (software renderers included). */
export type AdapterChoice = "hardware" | "software";

/** What an adapter says about itself (GPUAdapterInfo's naming fields). */
export interface AdapterFacts {
  vendor?: string;
  architecture?: string;
  device?: string;
  description?: string;
  isFallbackAdapter?: boolean;
}

/** Renderers that run on the CPU: Mesa's llvmpipe (GL) and lavapipe (Vulkan) and softpipe, Google's SwiftShader, Microsoft's WARP. */
const SOFTWARE_RENDERER =
  /llvmpipe|lavapipe|softpipe|swiftshader|swrast|software rasterizer|basic render driver|\bwarp\b/i;

/**
 * Whether an adapter is a software renderer: the fallback adapter, or one whose names say so. Dawn reports
 * llvmpipe with isFallbackAdapter false, so the names decide; auto-detection never takes such an adapter.
 */
export function isSoftwareAdapter(info: AdapterFacts): boolean {
  if (info.isFallbackAdapter) return true;
  return [info.vendor, info.architecture, info.device, info.description].some((s) => !!s && SOFTWARE_RENDERER.test(s));
}

/** An adapter in a few words: "llvmpipe-llvm-15-0-6-256-bits, OpenGL ES 3.2 Mesa 22.3.6, software". */
export function adapterLabel(info: AdapterFacts): string {
  const name =
    (info.device || [info.vendor, info.architecture].filter(Boolean).join(" ")).replace(/-+$/, "") ||
    "an unnamed adapter";
  const about = info.description?.replace(/^OpenGL version /, "");
  return [name, about && about !== name ? about : "", isSoftwareAdapter(info) ? "software" : ""]
    .filter(Boolean)
    .join(", ");
}

/** How a start went: the backend's description ("webgpu (…)"), or why it cannot run here. */
export type WebgpuStart =
  | { ok: true; description: string; software: boolean }
  | {
      ok: false;
      why: string;
      /** No hardware adapter was found: asking for a software one might do. */ softwareMightDo?: boolean;
    };

/** What startWebgpu needs from its caller. */
export interface WebgpuOptions {
  adapter: AdapterChoice;
  /** Holds a GPU error for the next read back (or forward pass) to throw. */
  noteFault(message: string): void;
  /** The error held since the last call (and clears it), or null. */
  takeFault(): string | null;
  /** How long a synchronous read may wait for the GPU (ms); default READ_LIMIT_MS. */
  readLimitMs?: number;
}

/**
 * How long a synchronous read waits for the GPU before it gives up: a read waits for every kernel queued before
 * it, and a forward pass queues its whole model before its first read (the head's log-probabilities), which on
 * a software adapter takes minutes at 1B width. Only a hung device comes near this.
 */
export const READ_LIMIT_MS = 300_000;

// --- the event-loop addon (native/loop.c) ---
interface LoopAddon {
  runOnce(): number;
  muteStderr(): number;
  restoreStderr(saved: number): void;
}
const LOOP_ADDON = "native/build/Release/prefprobe_loop.node";
/** Written by scripts/build-native.mjs when the build fails: the reason, in one line. */
const LOOP_NOTE = "native/loop-failed.txt";
let loop: { addon: LoopAddon | null; why: string } | null = null;

function loadLoop(): { addon: LoopAddon | null; why: string } {
  if (loop) return loop;
  const root = packageRoot();
  // (not "a C compiler": the CLI would read the lone C as the --C flag)
  const how = "npm run build:native builds it with the system's compiler (gcc or clang)";
  if (!fs.existsSync(root + LOOP_ADDON)) {
    const note = buildNote(root, LOOP_NOTE);
    return (loop = { addon: null, why: `its event-loop addon (${LOOP_ADDON}) is missing: ${note}; ${how}` });
  }
  try {
    return (loop = { addon: createRequire(import.meta.url)(root + LOOP_ADDON) as LoopAddon, why: "" });
  } catch (e) {
    const msg = (e as Error).message.split("\n")[0];
    return (loop = { addon: null, why: `${LOOP_ADDON} does not load (${msg}); ${how}` });
  }
}

/** Whether the event-loop addon the webgpu backend needs is built and loads here (auto-detection probes only then). */
export const loopAvailable = (): boolean => loadLoop().addon !== null;

const pause = new Int32Array(new SharedArrayBuffer(4));

/**
 * Runs libuv's ready callbacks until `done()` or `limitMs` pass (then throws, naming `what`). After its first
 * millisecond it waits 0.1 ms between rounds instead of spinning: a software adapter's renderer threads need
 * the cores.
 *
 * Re-entrancy: whatever else is ready runs here, inside the caller's synchronous read — timers, immediates, I/O,
 * signal handlers and worker messages — but never a promise continuation (Node drains microtasks only when the
 * outermost callback returns; checked by resolving one from an immediate run in here: it ran after the read).
 * What prefprobe itself has waiting there touches no tensor and needs no order: the CLI's SIGINT handler (sets
 * the stop flag, or exits on a second Ctrl-C as it may at any moment), the stages' setImmediate yields (they
 * resolve a promise, whose continuation then waits for the read to return), cli-progress's redraw timer, the
 * Hub download's progress timer (before any compute), and a run's worker-pool messages (the main thread computes
 * nothing while its pool works, and a worker is sent its next task only after replying to the last one).
 */
export function spinUntil(addon: Pick<LoopAddon, "runOnce">, done: () => boolean, limitMs: number, what: string): void {
  const start = performance.now();
  while (!done()) {
    addon.runOnce();
    if (done()) return;
    const waited = performance.now() - start;
    if (waited > limitMs)
      throw new Error(
        `webgpu: ${what} did not finish within ${(limitMs / 1000).toFixed(0)} s: the GPU does not answer`,
      );
    if (waited > 1) Atomics.wait(pause, 0, 0, 0.1);
  }
}

// --- the parts of Dawn's and tfjs-backend-webgpu 4.x's objects this file uses ---
interface GpuBuffer {
  size: number;
  mapState: "unmapped" | "pending" | "mapped";
  mapAsync(mode: number): Promise<void>;
  getMappedRange(): ArrayBuffer;
  unmap(): void;
}
interface GpuDevice {
  limits: Record<string, number>;
  addEventListener(
    type: "uncapturederror",
    listener: (e: { error: { message: string }; preventDefault(): void }) => void,
  ): void;
  lost: Promise<{ reason?: string; message: string }>;
}
interface GpuAdapter {
  info?: AdapterFacts;
  isFallbackAdapter?: boolean;
  features: unknown;
  limits: Record<string, number>;
  requestDevice(descriptor?: unknown): Promise<GpuDevice>;
}
interface Gpu {
  requestAdapter(options?: Record<string, unknown>): Promise<GpuAdapter | null>;
  wgslLanguageFeatures?: unknown;
}
interface Dawn {
  create(flags: string[]): Gpu;
  globals: Record<string, unknown>;
}
interface TensorData {
  dtype: tf.DataType;
  shape: number[];
  values: tf.backend_util.BackendValues | null;
  resource: unknown;
}
interface WebgpuBackend {
  device: GpuDevice;
  tensorMap: { get(id: tf.DataId): TensorData | undefined };
  bufferManager: {
    acquireBuffer(size: number, usage: number): GpuBuffer;
    releaseBuffer(b: GpuBuffer, reuse?: boolean): void;
  };
  commandEncoder: {
    copyBufferToBuffer(src: GpuBuffer, so: number, dst: GpuBuffer, d: number, size: number): void;
  } | null;
  ensureCommandEncoderReady(): void;
  endComputePassEncoder(): void;
  submitQueue(): void;
  readSync(id: tf.DataId): tf.backend_util.BackendValues;
  read(id: tf.DataId): Promise<tf.backend_util.BackendValues>;
}
const INTERNALS = [
  "ensureCommandEncoderReady",
  "endComputePassEncoder",
  "submitQueue",
  "readSync",
  "read",
] as const satisfies ReadonlyArray<keyof WebgpuBackend>;

// specifiers kept out of TypeScript's sight: both packages are optional dependencies
const DAWN_PACKAGE: string = "webgpu";
const TFJS_WEBGPU: string = "@tensorflow/tfjs-backend-webgpu";

/** Dawn instances by their flags: one per process is enough, and each probes the system's drivers again. */
const instances = new Map<string, Gpu>();
/** The start that made this process's webgpu backend (tfjs keeps one per process). */
let started: { adapter: AdapterChoice; result: WebgpuStart & { ok: true } } | null = null;

const firstLine = (e: unknown) => (e instanceof Error ? e.message : String(e)).split("\n")[0]!.trim();

/** Why Dawn's bindings do not load: not installed, or no dawn.node for this platform. */
export function dawnMissing(e: unknown): string {
  const msg = firstLine(e);
  if ((e as { code?: string }).code === "ERR_MODULE_NOT_FOUND" && /'webgpu'/.test(msg))
    return "the npm package webgpu is not installed (an optional dependency: npm ci installs it unless --omit=optional)";
  return `webgpu is not available on this platform (${process.platform}-${process.arch}): ${msg}`;
}

/**
 * Starts the webgpu backend on the adapter `opts.adapter` allows and makes it the current tfjs backend, or says
 * why it cannot run here; with "hardware" a software renderer is refused. Dawn's warnings while
 * it probes the drivers (a missing Vulkan loader, limits it lowers) are kept off stderr.
 */
export async function startWebgpu(opts: WebgpuOptions): Promise<WebgpuStart> {
  if (started && tf.findBackend("webgpu")) {
    if (started.adapter !== opts.adapter)
      return {
        ok: false,
        why: `this process's webgpu backend already runs on another adapter (${started.result.description})`,
      };
    return (await tf.setBackend("webgpu"))
      ? started.result
      : { ok: false, why: "the webgpu backend does not start again" };
  }
  const l = loadLoop();
  if (!l.addon) return { ok: false, why: l.why };
  let dawn: Dawn;
  try {
    dawn = (await import(DAWN_PACKAGE)) as Dawn;
  } catch (e) {
    return { ok: false, why: dawnMissing(e) };
  }
  const saved = l.addon.muteStderr();
  try {
    const r = await start(dawn, l.addon, opts);
    if (r.ok) started = { adapter: opts.adapter, result: r };
    return r;
  } finally {
    l.addon.restoreStderr(saved);
  }
}

async function start(dawn: Dawn, addon: LoopAddon, opts: WebgpuOptions): Promise<WebgpuStart> {
  // tfjs names these as globals (GPUBufferUsage, GPUMapMode, instanceof GPUBuffer), as a browser has them
  for (const [k, v] of Object.entries(dawn.globals))
    if (!(k in globalThis)) Object.defineProperty(globalThis, k, { value: v, configurable: true, writable: true });
  const software = opts.adapter === "software";
  // Mesa's EGL without a display server, unless the user chose a platform
  if (software) process.env.EGL_PLATFORM ??= "surfaceless";
  const flags = software ? ["backend=opengles"] : [];
  const key = flags.join(" ");
  if (!instances.has(key)) instances.set(key, dawn.create(flags));
  const gpu = instances.get(key)!;
  // OpenGL ES reaches only WebGPU's compatibility level; the default backends (Vulkan, Metal, D3D12) the core one
  const request = software
    ? { featureLevel: "compatibility", powerPreference: "high-performance" }
    : { powerPreference: "high-performance" };
  const adapter = await gpu.requestAdapter(request).catch(() => null);
  if (!adapter)
    return {
      ok: false,
      why: software
        ? "Dawn found no OpenGL ES adapter: Mesa's EGL and GLES drivers are needed (on Debian/Ubuntu: apt-get install libegl1 libegl-mesa0 libgles2 libgl1-mesa-dri)"
        : `Dawn found no GPU adapter (through ${process.platform === "darwin" ? "Metal" : process.platform === "win32" ? "D3D12 or Vulkan" : "Vulkan"})`,
      softwareMightDo: !software,
    };
  const info: AdapterFacts = {
    ...pick(adapter.info),
    isFallbackAdapter: adapter.isFallbackAdapter ?? adapter.info?.isFallbackAdapter,
  };
  const isSoftware = isSoftwareAdapter(info);
  const label = adapterLabel(info);
  if (isSoftware && !software)
    return { ok: false, why: `Dawn's only adapter is a software renderer (${label})`, softwareMightDo: true };

  // tfjs asks navigator.gpu for an adapter with options of its own: it gets the one chosen here, and any
  // failure to make its device is kept for the message
  let deviceFailure = "";
  let handed = false;
  const shim = {
    requestAdapter: async () => {
      const a = handed ? await gpu.requestAdapter(request) : adapter;
      handed = true;
      if (!a) return null;
      return {
        features: a.features,
        limits: a.limits,
        info: a.info,
        requestDevice: (d?: unknown) =>
          a.requestDevice(d).catch((e: unknown) => {
            deviceFailure = firstLine(e);
            throw e;
          }),
      };
    },
    getPreferredCanvasFormat: () => "rgba8unorm",
    wgslLanguageFeatures: gpu.wgslLanguageFeatures ?? new Set<string>(),
  };
  const nav = (globalThis as { navigator?: object }).navigator;
  if (nav === undefined)
    Object.defineProperty(globalThis, "navigator", { value: { gpu: shim }, configurable: true, writable: true });
  else Object.defineProperty(nav, "gpu", { value: shim, configurable: true, writable: true });

  try {
    await import(TFJS_WEBGPU); // registers "webgpu" with tfjs, now that navigator.gpu exists
  } catch (e) {
    return { ok: false, why: `${TFJS_WEBGPU} does not load (${firstLine(e)})` };
  }
  if (!tf.findBackendFactory("webgpu"))
    return {
      ok: false,
      why: `${TFJS_WEBGPU} did not register its backend (was it imported before prefprobe started it?)`,
    };
  const on = await tf.setBackend("webgpu").catch(() => false);
  if (!on)
    return { ok: false, why: `the adapter (${label}) gave no device${deviceFailure ? `: ${deviceFailure}` : ""}` };
  await tf.ready();
  const be = tf.backend() as unknown as WebgpuBackend;
  const missing = INTERNALS.filter((k) => typeof be[k] !== "function");
  if (missing.length || !be.bufferManager || !be.tensorMap || !be.device)
    return {
      ok: false,
      why: `this ${TFJS_WEBGPU} lacks the internals prefprobe reads tensors back with (${missing.join(", ") || "bufferManager, tensorMap, device"}); it was written for 4.22`,
    };
  // a WebGPU error surfaces only as an event, after the call that caused it returned: held for the next read
  be.device.addEventListener("uncapturederror", (e) => {
    e.preventDefault(); // Dawn would print it as well
    opts.noteFault(firstLine(e.error.message));
  });
  void be.device.lost.then((i) => {
    if (i.reason !== "destroyed") opts.noteFault(`the GPU device was lost (${i.message.split("\n")[0]})`);
  });
  installReadback(be, addon, opts);
  return { ok: true, description: `webgpu (${label})`, software: isSoftware };
}

/** GPUAdapterInfo's fields are getters on its prototype: copied into a plain object. */
function pick(info: AdapterFacts | undefined): AdapterFacts {
  if (!info) return {};
  const { vendor, architecture, device, description } = info;
  return { vendor, architecture, device, description };
}

/**
 * Replaces the backend's readSync with a copy of the tensor's buffer into a mappable buffer and a wait for its
 * mapping (spinUntil), and makes both reads throw when the GPU reported an error since the last one: a failed
 * WebGPU call leaves its output unwritten and says so only through the error event.
 */
function installReadback(be: WebgpuBackend, addon: LoopAddon, opts: WebgpuOptions): void {
  const usage = globalThis as unknown as {
    GPUBufferUsage: { COPY_DST: number; MAP_READ: number };
    GPUMapMode: { READ: number };
  };
  const limit = opts.readLimitMs ?? READ_LIMIT_MS;
  const checked = <T>(v: T): T => {
    const fault = opts.takeFault();
    if (fault)
      throw new Error(`webgpu: the GPU reported an error, so the numbers read back cannot be trusted: ${fault}`);
    return v;
  };
  const own = be.readSync.bind(be);
  const ownRead = be.read.bind(be);
  be.read = async (id) => checked(await ownRead(id));
  be.readSync = (id: tf.DataId) => {
    const d = be.tensorMap.get(id);
    if (!d) throw new Error("webgpu: reading a tensor that is not on the backend (disposed?)");
    // values already on the CPU, strings, and complex numbers (whose parts come back through this function) are
    // tfjs's own case
    if (d.values != null || d.dtype === "string" || d.dtype === "complex64") return own(id);
    const n = tf.util.sizeFromShape(d.shape);
    if (n === 0) return checked(tf.util.getTypedArrayFromDType(d.dtype as "float32", 0));
    const src = d.resource as GpuBuffer | null;
    const bytes = 4 * n; // float32, int32 and bool all take 4 bytes a value on this backend
    if (!src || !(src.size >= bytes))
      throw new Error(`webgpu: a [${d.shape}] ${d.dtype} tensor has no GPU buffer to read`);
    const staging = be.bufferManager.acquireBuffer(
      bytes,
      usage.GPUBufferUsage.COPY_DST | usage.GPUBufferUsage.MAP_READ,
    );
    be.ensureCommandEncoderReady();
    be.endComputePassEncoder();
    be.commandEncoder!.copyBufferToBuffer(src, 0, staging, 0, bytes);
    be.submitQueue();
    // a failed mapping shows as the buffer going back to "unmapped"; its rejection is seen there
    staging.mapAsync(usage.GPUMapMode.READ).catch(() => {});
    try {
      spinUntil(addon, () => staging.mapState !== "pending", limit, `reading a [${d.shape}] ${d.dtype} tensor back`);
      checked(null);
      if (staging.mapState !== "mapped") throw new Error("webgpu: the GPU did not map a buffer to read a tensor back");
    } catch (e) {
      if (staging.mapState === "mapped") staging.unmap();
      be.bufferManager.releaseBuffer(staging, false);
      throw e;
    }
    const data = staging.getMappedRange().slice(0);
    staging.unmap();
    be.bufferManager.releaseBuffer(staging);
    const values = tf.util.convertBackendValuesAndArrayBuffer(data, d.dtype);
    d.values = values; // kept, as tfjs's own reads keep them: a second read costs nothing
    return values;
  };
}
