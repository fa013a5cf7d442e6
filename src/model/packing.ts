// Shared prompts: rows 2i and 2i+1 of a batch are one preference pair, its chosen and rejected sequences, which
// begin with the same prompt. Packed, the pair is one row [prompt, chosen response, rejected response]: the
// rejected response attends to the prompt and to itself only, and its positions restart where the prompt ends,
// so every token sees exactly what it sees in its own row while the prompt's tokens are computed once.

/** How a batch of pairs maps onto packed rows (row-major flat indices throughout). */
export interface Packing {
  rows: number; // packed rows: one per pair
  T: number; // packed length: the longest prompt + chosen + rejected response
  ids: number[][]; // [rows][T], padded with 0
  positions: Int32Array; // [rows × T]: the rotary position of each slot
  mask: Float32Array; // [rows × T × T]: 0 where a query slot may attend to a key slot, −1e9 elsewhere
  pack: Int32Array; // [rows × T]: the unpacked [B × Tu] entry each slot holds (slot 0 of the pair for padding)
  unpack: Int32Array; // [B × Tu]: the slot that holds each unpacked entry (slot 0 of the pair past a row's length)
  /** Slots of the prompts, and the rejected rows' unpacked entries holding the same tokens (for checks). */
  promptSlots: Int32Array;
  rejectedPrompt: Int32Array;
}

/** Packs right-padded rows ids [B][Tu] (true lengths `lengths`) whose pair i shares its first prompts[i] tokens. */
export function packPairs(ids: number[][], lengths: number[], prompts: number[]): Packing {
  const B = ids.length;
  const Tu = ids[0]!.length;
  if (B % 2 !== 0 || prompts.length !== B / 2)
    throw new RangeError(`paired prompts need two rows per pair: ${B} rows, ${prompts.length} prompts`);
  const rows = B / 2;
  const spans = prompts.map((p, i) => {
    const [lc, lr] = [lengths[2 * i]!, lengths[2 * i + 1]!];
    if (!(Number.isInteger(p) && p >= 1 && p <= Math.min(lc, lr)))
      throw new RangeError(`pair ${i}: prompt length ${p} outside 1..${Math.min(lc, lr)}`);
    for (let t = 0; t < p; t++)
      if (ids[2 * i]![t] !== ids[2 * i + 1]![t])
        throw new RangeError(`pair ${i}: its two rows differ at prompt position ${t}`);
    return { p, lc, lr, len: lc + lr - p };
  });
  const T = Math.max(...spans.map((s) => s.len));
  const packed = spans.map(() => new Array<number>(T).fill(0));
  const positions = new Int32Array(rows * T);
  const pack = new Int32Array(rows * T);
  const unpack = new Int32Array(B * Tu);
  const segment = new Int8Array(rows * T); // 0 prompt, 1 chosen, 2 rejected, 3 padding
  const promptSlots: number[] = [];
  const rejectedPrompt: number[] = [];
  spans.forEach(({ p, lc, len }, i) => {
    const [c, r] = [2 * i, 2 * i + 1];
    for (let k = 0; k < T; k++) {
      const slot = i * T + k;
      // the unpacked entry this slot holds: chosen row up to its end, then the rejected row's response
      const [row, t, seg] = k < p ? [c, k, 0] : k < lc ? [c, k, 1] : k < len ? [r, p + k - lc, 2] : [c, 0, 3];
      packed[i]![k] = seg === 3 ? 0 : ids[row]![t]!;
      positions[slot] = seg === 3 ? 0 : t;
      pack[slot] = row * Tu + t;
      segment[slot] = seg;
      if (seg !== 3) unpack[row * Tu + t] = slot;
      if (seg === 0) {
        unpack[r * Tu + t] = slot;
        promptSlots.push(slot);
        rejectedPrompt.push(r * Tu + t);
      }
    }
    for (const row of [c, r]) for (let t = lengths[row]!; t < Tu; t++) unpack[row * Tu + t] = i * T;
  });
  const mask = new Float32Array(rows * T * T).fill(-1e9);
  for (let i = 0; i < rows; i++)
    for (let q = 0; q < T; q++)
      for (let k = 0; k <= q; k++) {
        const [sq, sk] = [segment[i * T + q]!, segment[i * T + k]!];
        if (sk !== 3 && (sk === 0 || sk === sq || sq === 3)) mask[(i * T + q) * T + k] = 0;
      }
  return {
    rows,
    T,
    ids: packed,
    positions,
    mask,
    pack,
    unpack,
    promptSlots: Int32Array.from(promptSlots),
    rejectedPrompt: Int32Array.from(rejectedPrompt),
  };
}
