// Writes a random BF16 model pair with Llama-3.2-1B's exact config and `layers` layers (16 = the real size), and
// the real Llama 3 tokenizer: OUT_DIR/base and OUT_DIR/tuned. See bench/llama-1b-shaped.ts.
//   npx tsx scripts/make-1b-shaped.ts OUT_DIR [layers]
import { writeLlama1bShaped } from "../bench/llama-1b-shaped.js";

const out = process.argv[2];
if (!out) throw new Error("usage: make-1b-shaped.ts OUT_DIR [layers]");
writeLlama1bShaped(out, Number(process.argv[3] ?? 16), console.log);
