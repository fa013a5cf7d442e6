// Patch one attention head's output (attn.hook_z) from the tuned model into the base model, and measure how
// much of the tuned model's margin gain it brings back.
//   npx tsx examples/patch-head.ts [layer] [head] [pairs]
import {
  disposeModel,
  forward,
  hookName,
  loadModel,
  loadPairs,
  makeBatch,
  marginsOf,
  responseLogprobs,
  tf,
} from "prefprobe";

const [layer, head, limit] = [Number(process.argv[2] ?? 3), Number(process.argv[3] ?? 0), Number(process.argv[4] ?? 4)];
const base = await loadModel("fixtures/models/stories260k");
if (!(Number.isInteger(head) && head >= 0 && head < base.config.numHeads))
  throw new Error(`head must be in 0..${base.config.numHeads - 1}`);
const tuned = await loadModel("fixtures/models/stories260k-dpo");
const pairs = loadPairs("fixtures/data/stories/test.jsonl", "fixtures/models/stories260k", { limit });
const site = hookName("z", layer); // blocks.{layer}.attn.hook_z: [batch, tokens, heads, head_dim]

// Rows 2i / 2i+1 are pair i's prompt+chosen / prompt+rejected, right-padded; logits only where responses are scored.
const batch = makeBatch(pairs);
const run = { lengths: batch.lengths, logitsAt: batch.logitsAt };
const margins = (logits: tf.Tensor | null) => marginsOf(responseLogprobs(logits!, batch, false));

const clean = forward(base, batch.ids, run);
const source = forward(tuned, batch.ids, { ...run, cache: [site] });
const zTuned = source.cache.get(site);
// keep every head of the base model but `head`, which takes the tuned model's value
const onlyHead = tf.tidy(() =>
  tf.reshape(tf.oneHot(tf.tensor1d([head], "int32"), base.config.numHeads), [1, 1, base.config.numHeads, 1]),
);
const patched = forward(base, batch.ids, {
  ...run,
  hooks: { [site]: (z) => tf.add(tf.mul(z, tf.sub(1, onlyHead)), tf.mul(zTuned, onlyHead)) },
});

const [mBase, mTuned, mPatched] = [margins(clean.logits), margins(source.logits), margins(patched.logits)];
let gain = 0;
let gap = 0;
pairs.forEach((p, i) => {
  gain += mPatched[i]! - mBase[i]!;
  gap += mTuned[i]! - mBase[i]!;
  console.log(
    `pair ${p.index}: base ${mBase[i]!.toFixed(6)}  tuned ${mTuned[i]!.toFixed(6)}  base with tuned head ${mPatched[i]!.toFixed(6)}`,
  );
});
console.log(`patching head ${head} of ${site} recovers ${(gain / gap).toFixed(6)} of the tuned model's margin gain`);

for (const r of [clean, source, patched]) r.dispose(); // logits and the cached z
onlyHead.dispose();
disposeModel(base);
disposeModel(tuned);
