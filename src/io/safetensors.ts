// safetensors reader and writer (format: 8-byte little-endian header length, JSON header, raw data).
// Every rule is checked before any byte of data is trusted; each tensor is read on its own so that loading
// a large file never holds the file and its decoded copy at once.
import * as fs from "node:fs";
import * as path from "node:path";

/** The dtypes this module reads and writes. BF16 and F16 are widened exactly to float32 on read. */
export type DType = "F32" | "F16" | "BF16" | "F64" | "I32" | "I64" | "U8" | "BOOL";

export const DTYPE_BYTES: Record<DType, number> = { F32: 4, F16: 2, BF16: 2, F64: 8, I32: 4, I64: 8, U8: 1, BOOL: 1 };

/** Largest JSON header accepted (the format's own reference implementation caps it at 100 MB). */
export const MAX_HEADER_BYTES = 100_000_000;

/** Decoded tensor data: F16/BF16/F32 → Float32Array, F64 → Float64Array, I64 → BigInt64Array. */
export type TensorData = Float32Array | Float64Array | Int32Array | BigInt64Array | Uint8Array;

/** One tensor as stored: its dtype on disk, its shape, and its decoded values. */
export interface StoredTensor {
  dtype: DType;
  shape: number[];
  data: TensorData;
}

/** Where a tensor lies in a file, as validated from the header. */
export interface TensorEntry {
  name: string;
  dtype: DType;
  shape: number[];
  begin: number; // absolute byte offset in the file
  end: number;
}

/** A problem with a safetensors file or folder, reported as one line. */
export class SafetensorsError extends Error {
  override name = "SafetensorsError";
}

/** Reads and validates a file's header; returns its tensors (sorted by offset) and metadata. */
export function readHeader(file: string): { entries: TensorEntry[]; metadata: Record<string, string> } {
  const fd = openOrThrow(file);
  try {
    return parseHeaderFrom(fd, file, fs.fstatSync(fd).size);
  } finally {
    fs.closeSync(fd);
  }
}

function openOrThrow(file: string): number {
  try {
    return fs.openSync(file, "r");
  } catch (e) {
    throw new SafetensorsError(`${file}: cannot open (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
  }
}

function parseHeaderFrom(fd: number, file: string, size: number) {
  const bad = (msg: string) => new SafetensorsError(`${file}: not a valid safetensors file: ${msg}`);
  if (size < 8) throw bad(`file is ${size} bytes, shorter than the 8-byte header length`);
  const lenBuf = Buffer.alloc(8);
  fs.readSync(fd, lenBuf, 0, 8, 0);
  const headerLen = lenBuf.readBigUInt64LE(0);
  if (headerLen > BigInt(MAX_HEADER_BYTES))
    throw bad(`header length ${headerLen} exceeds the ${MAX_HEADER_BYTES}-byte cap`);
  const hlen = Number(headerLen);
  if (8 + hlen > size) throw bad(`header length ${hlen} runs past the end of the ${size}-byte file`);
  const hbuf = Buffer.alloc(hlen);
  fs.readSync(fd, hbuf, 0, hlen, 8);
  let header: unknown;
  try {
    header = JSON.parse(hbuf.toString("utf8"));
  } catch {
    throw bad("header is not valid JSON");
  }
  if (header === null || typeof header !== "object" || Array.isArray(header)) throw bad("header is not a JSON object");
  const dataStart = 8 + hlen;
  const entries: TensorEntry[] = [];
  let metadata: Record<string, string> = {};
  for (const [name, raw] of Object.entries(header as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (raw === null || typeof raw !== "object" || Array.isArray(raw)) throw bad("__metadata__ is not an object");
      for (const v of Object.values(raw)) if (typeof v !== "string") throw bad("__metadata__ values must be strings");
      metadata = raw as Record<string, string>;
      continue;
    }
    const info = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (info === null || typeof info !== "object") throw bad(`entry "${name}" is not an object`);
    if (typeof info.dtype !== "string" || !(info.dtype in DTYPE_BYTES))
      throw bad(`tensor "${name}" has unknown dtype ${JSON.stringify(info.dtype)}`);
    const dtype = info.dtype as DType;
    if (!Array.isArray(info.shape) || !info.shape.every((d) => Number.isSafeInteger(d) && d >= 0))
      throw bad(`tensor "${name}" has an invalid shape`);
    const shape = info.shape as number[];
    const offs = info.data_offsets;
    if (
      !Array.isArray(offs) ||
      offs.length !== 2 ||
      !offs.every((o) => Number.isSafeInteger(o) && o >= 0) ||
      offs[0] > offs[1]
    ) {
      throw bad(`tensor "${name}" has invalid data_offsets`);
    }
    const [b, e] = offs as [number, number];
    const expected = shape.reduce((a, d) => a * d, 1) * DTYPE_BYTES[dtype];
    if (e - b !== expected)
      throw bad(`tensor "${name}" holds ${e - b} bytes but ${dtype}${JSON.stringify(shape)} needs ${expected}`);
    if (dataStart + e > size) throw bad(`tensor "${name}" data runs past the end of the file`);
    entries.push({ name, dtype, shape, begin: dataStart + b, end: dataStart + e });
  }
  entries.sort((x, y) => x.begin - y.begin || x.end - y.end);
  let cursor = dataStart;
  for (const en of entries) {
    if (en.begin < cursor) throw bad(`tensor "${en.name}" overlaps the tensor before it`);
    if (en.begin > cursor) throw bad(`gap in the data before tensor "${en.name}" (data must be contiguous)`);
    cursor = en.end;
  }
  if (cursor !== size) throw bad(`${size - cursor} bytes after the last tensor are not described by the header`);
  return { entries, metadata };
}

/** Decodes raw little-endian bytes of one dtype; BF16/F16 widen exactly to float32. */
export function decode(dtype: DType, bytes: Uint8Array): TensorData {
  const n = bytes.byteLength / DTYPE_BYTES[dtype];
  const aligned = bytes.byteOffset % 8 === 0 ? bytes : bytes.slice();
  const buf = aligned.buffer;
  const off = aligned.byteOffset;
  switch (dtype) {
    case "F32":
      return new Float32Array(buf.slice(off, off + n * 4));
    case "F64":
      return new Float64Array(buf.slice(off, off + n * 8));
    case "I32":
      return new Int32Array(buf.slice(off, off + n * 4));
    case "I64":
      return new BigInt64Array(buf.slice(off, off + n * 8));
    case "U8":
    case "BOOL":
      return new Uint8Array(buf.slice(off, off + n));
    case "BF16": {
      const src = new Uint16Array(buf, off, n);
      const out = new Uint32Array(n);
      for (let i = 0; i < n; i++) out[i] = src[i]! << 16;
      return new Float32Array(out.buffer);
    }
    case "F16": {
      const src = new Uint16Array(buf, off, n);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = halfToFloat(src[i]!);
      return out;
    }
  }
}

/** The dtypes model weights may be stored in. */
export type WeightDType = Extract<DType, "F32" | "F16" | "BF16">;

/**
 * The raw bit patterns of stored F32 (Uint32Array) or F16/BF16 (Uint16Array) values, viewed in place when the
 * bytes are aligned to their width, else from a copy.
 */
export function storedBits(dtype: WeightDType, bytes: Uint8Array): Uint32Array | Uint16Array {
  const width = DTYPE_BYTES[dtype];
  const b = bytes.byteOffset % width === 0 ? bytes : bytes.slice();
  return width === 4
    ? new Uint32Array(b.buffer, b.byteOffset, b.byteLength / 4)
    : new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2);
}

/** IEEE 754 binary16 → number, exact (subnormals, infinities and NaN included). */
export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** number → IEEE 754 binary16 bits, round to nearest even. */
export function floatToHalf(x: number): number {
  const f32 = new Float32Array([x]);
  const u = new Uint32Array(f32.buffer)[0]!;
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    let r = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    if (rem > half || (rem === half && r & 1)) r++;
    return sign | r;
  }
  let r = mant >>> 13;
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && r & 1)) {
    r++;
    if (r === 0x400) {
      r = 0;
      e++;
      if (e >= 31) return sign | 0x7c00;
    }
  }
  return sign | (e << 10) | r;
}

const F32 = new Float32Array(1);
const U32 = new Uint32Array(F32.buffer);

/** float32 value → bfloat16 bits, round to nearest even (NaN stays NaN). */
export function floatToBf16(x: number): number {
  F32[0] = x;
  const u = U32[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** Reads the named tensors (all when `names` is omitted) of one file into a map. */
export function readSafetensors(file: string, names?: Iterable<string>): Map<string, StoredTensor> {
  return new Map(iterSafetensors(file, names));
}

/** A tensor's bytes as stored (little-endian, in the file's dtype), not decoded. */
export interface RawTensor {
  dtype: DType;
  shape: number[];
  bytes: Uint8Array;
}

/** Yields the named tensors (all when omitted) of one file one at a time, so a caller can drop each after use. */
export function* iterSafetensors(file: string, names?: Iterable<string>): Generator<[string, StoredTensor]> {
  for (const [name, t] of iterRawSafetensors(file, names))
    yield [name, { dtype: t.dtype, shape: t.shape, data: decode(t.dtype, t.bytes) }];
}

/** How raw bytes are held: `shared` puts each tensor in a SharedArrayBuffer, which worker threads use without a copy. */
export interface RawReadOptions {
  shared?: boolean;
}

/** iterSafetensors without decoding: each tensor's stored bytes. */
export function* iterRawSafetensors(
  file: string,
  names?: Iterable<string>,
  opts: RawReadOptions = {},
): Generator<[string, RawTensor]> {
  const fd = openOrThrow(file);
  try {
    const { entries } = parseHeaderFrom(fd, file, fs.fstatSync(fd).size);
    const want = names ? new Set(names) : null;
    if (want) {
      const have = new Set(entries.map((e) => e.name));
      for (const n of want) if (!have.has(n)) throw new SafetensorsError(`${file}: no tensor named "${n}"`);
    }
    for (const en of entries) {
      if (want && !want.has(en.name)) continue;
      const bytes = opts.shared
        ? new Uint8Array(new SharedArrayBuffer(en.end - en.begin))
        : new Uint8Array(en.end - en.begin);
      let got = 0;
      while (got < bytes.length) {
        const r = fs.readSync(fd, bytes, got, bytes.length - got, en.begin + got);
        if (r === 0) throw new SafetensorsError(`${file}: unexpected end of file in tensor "${en.name}"`);
        got += r;
      }
      yield [en.name, { dtype: en.dtype, shape: en.shape, bytes }];
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Values to write: data is encoded to `dtype` (F16/BF16 rounded to nearest even). */
export interface TensorToWrite {
  dtype: DType;
  shape: number[];
  data: ArrayLike<number> | BigInt64Array;
}

function encode(name: string, t: TensorToWrite): Uint8Array {
  const n = t.shape.reduce((a, d) => a * d, 1);
  if (t.data.length !== n)
    throw new SafetensorsError(`tensor "${name}": ${t.data.length} values for shape ${JSON.stringify(t.shape)}`);
  const num = t.data as ArrayLike<number>;
  switch (t.dtype) {
    case "F32":
      return new Uint8Array(Float32Array.from(num).buffer);
    case "F64":
      return new Uint8Array(Float64Array.from(num).buffer);
    case "I32":
      return new Uint8Array(Int32Array.from(num).buffer);
    case "I64":
      return new Uint8Array(
        (t.data instanceof BigInt64Array ? t.data.slice() : BigInt64Array.from(Array.from(num, (v) => BigInt(v))))
          .buffer,
      );
    case "U8":
    case "BOOL":
      return Uint8Array.from(num);
    case "BF16":
      return new Uint8Array(mapTo16(num, floatToBf16).buffer);
    case "F16":
      return new Uint8Array(mapTo16(num, floatToHalf).buffer);
  }
}

/** `f` over every value into a new Uint16Array, in a plain loop (TypedArray.from with a map function copies a large input into a JS array first). */
function mapTo16(x: ArrayLike<number>, f: (v: number) => number): Uint16Array {
  const out = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = f(x[i]!);
  return out;
}

/** Writes a safetensors file atomically (temporary file, then rename): never a half-written output. */
export function writeSafetensors(
  file: string,
  tensors: Record<string, TensorToWrite>,
  metadata?: Record<string, string>,
): void {
  const names = Object.keys(tensors).sort();
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length) header.__metadata__ = metadata;
  const blobs: Uint8Array[] = [];
  let offset = 0;
  for (const name of names) {
    const t = tensors[name]!;
    if (!(t.dtype in DTYPE_BYTES)) throw new SafetensorsError(`tensor "${name}": unknown dtype ${t.dtype}`);
    const blob = encode(name, t);
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + blob.byteLength] };
    blobs.push(blob);
    offset += blob.byteLength;
  }
  let json = JSON.stringify(header);
  while ((8 + Buffer.byteLength(json)) % 8 !== 0) json += " ";
  const hb = Buffer.from(json, "utf8");
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64LE(BigInt(hb.length));
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, "w");
  try {
    fs.writeSync(fd, lenBuf);
    fs.writeSync(fd, hb);
    for (const b of blobs) fs.writeSync(fd, b);
    fs.closeSync(fd);
    fs.renameSync(tmp, file);
  } catch (e) {
    try {
      fs.closeSync(fd);
    } catch {
      /* already closed */
    }
    fs.rmSync(tmp, { force: true });
    throw e;
  }
}

/** Lists (file → tensor names) for a folder holding model.safetensors or a sharded index. */
export function folderShards(dir: string): Map<string, string[]> {
  const single = path.join(dir, "model.safetensors");
  const index = path.join(dir, "model.safetensors.index.json");
  if (fs.existsSync(index)) {
    let parsed: { weight_map?: Record<string, unknown> };
    try {
      parsed = JSON.parse(fs.readFileSync(index, "utf8"));
    } catch {
      throw new SafetensorsError(`${index}: not valid JSON`);
    }
    const wm = parsed.weight_map;
    if (!wm || typeof wm !== "object") throw new SafetensorsError(`${index}: no weight_map object`);
    const shards = new Map<string, string[]>();
    for (const [tensor, shard] of Object.entries(wm)) {
      if (
        typeof shard !== "string" ||
        shard === "" ||
        shard !== path.basename(shard) ||
        shard === "." ||
        shard === ".."
      ) {
        throw new SafetensorsError(
          `${index}: shard name ${JSON.stringify(shard)} for "${tensor}" must be a plain file name inside the folder`,
        );
      }
      const file = path.join(dir, shard);
      if (!shards.has(file)) shards.set(file, []);
      shards.get(file)!.push(tensor);
    }
    for (const file of shards.keys())
      if (!fs.existsSync(file)) throw new SafetensorsError(`${index}: shard ${path.basename(file)} is missing`);
    return shards;
  }
  if (fs.existsSync(single)) return new Map([[single, readHeader(single).entries.map((e) => e.name)]]);
  throw new SafetensorsError(`${dir}: no model.safetensors or model.safetensors.index.json`);
}

/** Yields every tensor of a model folder (single file or sharded) one at a time. */
export function* iterSafetensorsFolder(dir: string): Generator<[string, StoredTensor]> {
  for (const [file, names] of folderShards(dir)) yield* iterSafetensors(file, names);
}

/** Yields every tensor of a model folder as stored bytes, one at a time. */
export function* iterRawSafetensorsFolder(dir: string, opts: RawReadOptions = {}): Generator<[string, RawTensor]> {
  for (const [file, names] of folderShards(dir)) yield* iterRawSafetensors(file, names, opts);
}

/** Reads every tensor of a model folder (single file or sharded) into a map. */
export function readSafetensorsFolder(dir: string): Map<string, StoredTensor> {
  return new Map(iterSafetensorsFolder(dir));
}
