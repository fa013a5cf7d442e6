// Margins of named patched runs through the engine: each run is the base model with the tuned model's residual
// stream after layer l put in place of its own. Recovery = mean gain / mean gap.
//   npx tsx examples/patch-layers.ts [pairs]
import {
  disposeModel,
  initBackend,
  loadModel,
  loadPairs,
  makeBatch,
  margins,
  residAfter,
  runMargins,
  tf,
} from "prefprobe";

await initBackend();
const [base, tuned] = [
  await loadModel("fixtures/models/stories260k"),
  await loadModel("fixtures/models/stories260k-dpo"),
];
const pairs = loadPairs("fixtures/data/stories/test.jsonl", "fixtures/models/stories260k", {
  limit: Number(process.argv[2] ?? 8),
});
const mean = (x: ArrayLike<number>) => Array.from(x).reduce((a, b) => a + b, 0) / x.length;

// reward margins log p(chosen | prompt) − log p(rejected | prompt), one per pair
const [mBase, mTuned] = [margins(base, pairs), margins(tuned, pairs)];
const gap = mean(mTuned) - mean(mBase);

// one named run per layer: enter the base model after layer l with the tuned model's resid_post there
const batch = makeBatch(pairs);
const L = base.config.numLayers;
const runs = Array.from({ length: L }, (_, l) => ({
  name: `layer ${l}`,
  layer: l + 1,
  resid: residAfter(tuned, batch, l),
}));
const patched = runMargins(base, batch, runs);
console.log(`mean gap ${gap.toFixed(4)} over ${pairs.length} pairs`);
for (const r of runs)
  console.log(`${r.name}: recovery ${((mean(patched.get(r.name)!) - mean(mBase)) / gap).toFixed(4)}`);

tf.dispose(runs.map((r) => r.resid));
[base, tuned].forEach(disposeModel);
