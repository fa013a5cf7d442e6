// safetensors: write→read round trips for every dtype, and a clear error for each malformed-file rule.
import * as fs from "node:fs";
import * as path from "node:path";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { tempDir } from "./tempdirs.js";
import {
  decode,
  floatToBf16,
  floatToHalf,
  halfToFloat,
  readHeader,
  readSafetensors,
  readSafetensorsFolder,
  writeSafetensors,
  MAX_HEADER_BYTES,
  SafetensorsError,
  type DType,
} from "../src/io/safetensors.js";
import { firstNonFinite } from "../src/io/model.js";
import { transposedF32 } from "../src/io/stream.js";
import { transposeData } from "../src/model/weights.js";

const tmp = () => tempDir("st");

/** Builds a file from a raw header object and data bytes, bypassing the writer. */
function rawFile(header: unknown, data: Uint8Array | number, headerText?: string): string {
  const json = Buffer.from(headerText ?? JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  const file = path.join(tmp(), "x.safetensors");
  fs.writeFileSync(file, Buffer.concat([len, json, typeof data === "number" ? Buffer.alloc(data) : Buffer.from(data)]));
  return file;
}

const f32 = new Float32Array(4);

describe("safetensors round trip", () => {
  const shape = fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 3 });
  const count = (s: number[]) => s.reduce((a, b) => a * b, 1);

  it("F32, F64, I32, U8, BOOL and I64 values survive write → read exactly", () => {
    const cases: Array<[DType, fc.Arbitrary<number>]> = [
      ["F32", fc.float({ noNaN: true })],
      ["F64", fc.double({ noNaN: true })],
      ["I32", fc.integer()],
      ["U8", fc.integer({ min: 0, max: 255 })],
      ["BOOL", fc.integer({ min: 0, max: 1 })],
      ["I64", fc.maxSafeInteger()],
    ];
    for (const [dtype, arb] of cases) {
      fc.assert(
        fc.property(
          fc
            .array(shape, { minLength: 1, maxLength: 3 })
            .chain((shapes) =>
              fc.tuple(
                ...shapes.map((s) =>
                  fc.tuple(fc.constant(s), fc.array(arb, { minLength: count(s), maxLength: count(s) })),
                ),
              ),
            ),
          (tensors) => {
            const file = path.join(tmp(), "rt.safetensors");
            const obj = Object.fromEntries(tensors.map(([s, d], i) => [`t${i}`, { dtype, shape: s, data: d }]));
            writeSafetensors(file, obj, { note: "x" });
            const back = readSafetensors(file);
            expect(readHeader(file).metadata).toEqual({ note: "x" });
            tensors.forEach(([s, d], i) => {
              const t = back.get(`t${i}`)!;
              expect(t.dtype).toBe(dtype);
              expect(t.shape).toEqual(s);
              const got = Array.from(t.data as ArrayLike<number | bigint>, Number);
              expect(got).toEqual(dtype === "F32" ? Array.from(Float32Array.from(d)) : d);
            });
          },
        ),
        { numRuns: 30 },
      );
    }
  });

  it("F16 and BF16 round to nearest even on write and widen exactly on read", () => {
    fc.assert(
      fc.property(
        fc.array(fc.float({ noNaN: true, min: -60000, max: 60000 }), { minLength: 1, maxLength: 40 }),
        (vals) => {
          const file = path.join(tmp(), "h.safetensors");
          writeSafetensors(file, {
            h: { dtype: "F16", shape: [vals.length], data: vals },
            b: { dtype: "BF16", shape: [vals.length], data: vals },
          });
          const back = readSafetensors(file);
          const h = Array.from(back.get("h")!.data as Float32Array);
          const b = Array.from(back.get("b")!.data as Float32Array);
          vals.forEach((v, i) => {
            // F16: within half an ulp (relative 2^-11, or 2^-25 absolute for subnormals)
            expect(Math.abs(h[i]! - v)).toBeLessThanOrEqual(Math.max(Math.abs(v) * 2 ** -11, 2 ** -25));
            expect(Math.abs(b[i]! - v)).toBeLessThanOrEqual(Math.max(Math.abs(v) * 2 ** -8, 2 ** -134));
            // re-encoding a decoded value is exact
            expect(halfToFloat(floatToHalf(h[i]!))).toBe(h[i]!);
          });
        },
      ),
      { numRuns: 50 },
    );
    // exact known encodings
    expect(floatToHalf(1)).toBe(0x3c00);
    expect(floatToHalf(-2)).toBe(0xc000);
    expect(floatToHalf(65504)).toBe(0x7bff);
    expect(floatToHalf(2 ** -24)).toBe(0x0001);
    expect(halfToFloat(0x7c00)).toBe(Infinity);
    expect(floatToBf16(1)).toBe(0x3f80);
    expect(floatToBf16(1 + 2 ** -8)).toBe(0x3f80); // tie → even
    expect(floatToBf16(1 + 3 * 2 ** -8)).toBe(0x3f82); // tie → even (up)
  });

  it("reads a sharded folder through its index", () => {
    const dir = tmp();
    writeSafetensors(path.join(dir, "a.safetensors"), { x: { dtype: "F32", shape: [2], data: [1, 2] } });
    writeSafetensors(path.join(dir, "b.safetensors"), { y: { dtype: "F32", shape: [1], data: [3] } });
    fs.writeFileSync(
      path.join(dir, "model.safetensors.index.json"),
      JSON.stringify({ weight_map: { x: "a.safetensors", y: "b.safetensors" } }),
    );
    const all = readSafetensorsFolder(dir);
    expect(Array.from(all.get("x")!.data as Float32Array)).toEqual([1, 2]);
    expect(Array.from(all.get("y")!.data as Float32Array)).toEqual([3]);
  });

  it("never leaves a half-written file: a failed write keeps the old file and no temporary", () => {
    const dir = tmp();
    const file = path.join(dir, "keep.safetensors");
    writeSafetensors(file, { x: { dtype: "F32", shape: [1], data: [7] } });
    expect(() => writeSafetensors(file, { x: { dtype: "F32", shape: [3], data: [1] } })).toThrow(/values for shape/);
    expect(Array.from(readSafetensors(file).get("x")!.data as Float32Array)).toEqual([7]);
    expect(fs.readdirSync(dir)).toEqual(["keep.safetensors"]);
  });
});

describe("malformed safetensors give a clear error", () => {
  const ok = { a: { dtype: "F32", shape: [2], data_offsets: [0, 8] } };
  const cases: Array<[string, () => string, RegExp]> = [
    [
      "shorter than 8 bytes",
      () => {
        const f = path.join(tmp(), "s");
        fs.writeFileSync(f, Buffer.alloc(5));
        return f;
      },
      /shorter than the 8-byte/,
    ],
    [
      "header length past the end",
      () => {
        const f = rawFile(ok, 8);
        fs.truncateSync(f, 20);
        return f;
      },
      /runs past the end/,
    ],
    [
      "header length over the cap",
      () => {
        const f = path.join(tmp(), "c");
        const b = Buffer.alloc(16);
        b.writeBigUInt64LE(BigInt(MAX_HEADER_BYTES + 1));
        fs.writeFileSync(f, b);
        return f;
      },
      /exceeds the .* cap/,
    ],
    ["header not JSON", () => rawFile(null, 0, "{not json"), /not valid JSON/],
    ["header not an object", () => rawFile([1, 2], 0), /not a JSON object/],
    ["unknown dtype", () => rawFile({ a: { dtype: "Q4", shape: [2], data_offsets: [0, 8] } }, 8), /unknown dtype/],
    ["bad shape", () => rawFile({ a: { dtype: "F32", shape: [-2], data_offsets: [0, 8] } }, 8), /invalid shape/],
    [
      "bad offsets",
      () => rawFile({ a: { dtype: "F32", shape: [2], data_offsets: [8, 0] } }, 8),
      /invalid data_offsets/,
    ],
    [
      "byte count ≠ dtype × shape",
      () => rawFile({ a: { dtype: "F32", shape: [3], data_offsets: [0, 8] } }, 8),
      /needs 12/,
    ],
    [
      "offsets out of bounds",
      () => rawFile({ a: { dtype: "F32", shape: [2], data_offsets: [4, 12] } }, 8),
      /past the end of the file/,
    ],
    [
      "overlapping tensors",
      () =>
        rawFile(
          {
            a: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
            b: { dtype: "F32", shape: [1], data_offsets: [4, 8] },
          },
          8,
        ),
      /overlaps/,
    ],
    [
      "gap between tensors",
      () => rawFile({ a: { dtype: "F32", shape: [1], data_offsets: [4, 8] } }, 8),
      /gap in the data/,
    ],
    ["trailing bytes", () => rawFile(ok, 12), /not described by the header/],
    ["bad metadata", () => rawFile({ __metadata__: { x: 1 }, ...ok }, 8), /metadata/],
  ];
  it.each(cases)("%s", (_name, make, msg) => {
    const file = make();
    const run = () => readSafetensors(file);
    expect(run).toThrow(SafetensorsError);
    expect(run).toThrow(msg);
    try {
      run();
    } catch (e) {
      expect((e as Error).message).not.toContain("\n");
    }
  });

  it("a valid file passes the same checks", () => {
    const file = rawFile(ok, new Uint8Array(f32.buffer, 0, 8));
    expect(readSafetensors(file).get("a")!.shape).toEqual([2]);
  });

  it.each([["../outside.safetensors"], ["/etc/passwd"], ["sub/dir.safetensors"], [".."]])(
    "refuses shard name %s that leaves the folder",
    (shard) => {
      const dir = tmp();
      fs.writeFileSync(path.join(dir, "model.safetensors.index.json"), JSON.stringify({ weight_map: { x: shard } }));
      expect(() => readSafetensorsFolder(dir)).toThrow(/plain file name inside the folder/);
    },
  );

  it("names a missing shard, a missing index entry and a folder with no weights", () => {
    const dir = tmp();
    fs.writeFileSync(
      path.join(dir, "model.safetensors.index.json"),
      JSON.stringify({ weight_map: { x: "gone.safetensors" } }),
    );
    expect(() => readSafetensorsFolder(dir)).toThrow(/shard gone.safetensors is missing/);
    writeSafetensors(path.join(dir, "gone.safetensors"), { y: { dtype: "F32", shape: [1], data: [1] } });
    expect(() => readSafetensorsFolder(dir)).toThrow(/no tensor named "x"/);
    expect(() => readSafetensorsFolder(tmp())).toThrow(/no model.safetensors/);
  });
});

describe("finite checks on stored bytes", () => {
  it("firstNonFinite reads F32, F16 and BF16 bits (any alignment) as decoding them would", () => {
    fc.assert(
      fc.property(
        fc.constantFrom("F32" as const, "F16" as const, "BF16" as const),
        fc.uint8Array({ minLength: 0, maxLength: 64 }),
        fc.integer({ min: 0, max: 3 }),
        (dtype, raw, shift) => {
          const w = dtype === "F32" ? 4 : 2;
          const n = Math.floor(raw.length / w);
          const bytes = new Uint8Array(n * w + shift).subarray(shift); // an offset that may not be aligned
          bytes.set(raw.subarray(0, n * w));
          const decoded = decode(dtype, bytes) as Float32Array;
          expect(firstNonFinite(dtype, bytes)).toBe(decoded.findIndex((v) => !Number.isFinite(v)));
        },
      ),
      { numRuns: 500, seed: 7 },
    );
  });

  it("transposedF32 decodes and transposes in one pass what decode then transposeData give, at any alignment", () => {
    fc.assert(
      fc.property(
        fc.constantFrom("F32" as const, "F16" as const, "BF16" as const),
        fc.integer({ min: 1, max: 150 }),
        fc.integer({ min: 1, max: 70 }),
        fc.integer({ min: 0, max: 3 }),
        fc.integer(),
        (dtype, rows, cols, shift, seed) => {
          const w = dtype === "F32" ? 4 : 2;
          const bytes = new Uint8Array(rows * cols * w + shift).subarray(shift);
          for (let i = 0; i < bytes.length; i++) bytes[i] = (Math.imul(i + 1, seed | 1) >>> 13) & 255;
          const want = transposeData(decode(dtype, bytes) as Float32Array, rows, cols);
          const got = transposedF32(dtype, bytes, rows, cols, new Float32Array(rows * cols + 5));
          expect(got.length).toBe(rows * cols);
          expect(Array.from(got)).toEqual(Array.from(want)); // NaN payloads aside (the weights are checked finite first)
        },
      ),
      { numRuns: 200, seed: 8 },
    );
  });
});
