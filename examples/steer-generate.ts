// Steered vs unsteered generation. The direction is what `prefprobe run` saves as its steering vector: the mean
// over the pairs' response positions of h_tuned − h_base at one layer's resid_post (a run's
// subspace.safetensors holds it as mean_diff; readSubspace(file) reads it). Adding β times it to the base model
// at every position, each step, moves the base model's writing toward the tuned model's.
//   npx tsx examples/steer-generate.ts [layer] [beta] [steps]
import {
  disposeModel,
  greedy,
  initBackend,
  loadModel,
  loadPairs,
  loadTokenizer,
  makeBatch,
  residAfter,
  steeringHooks,
  tf,
} from "prefprobe";

await initBackend();
const [baseDir, tunedDir] = ["fixtures/models/stories260k", "fixtures/models/stories260k-dpo"];
const [layer, beta, steps] = [
  Number(process.argv[2] ?? 4),
  Number(process.argv[3] ?? 4),
  Number(process.argv[4] ?? 40),
];
const [base, tuned] = [await loadModel(baseDir), await loadModel(tunedDir)];
const tok = loadTokenizer(baseDir)!;

// the mean difference h_tuned − h_base at the layer, over the response tokens of 16 pairs
const batch = makeBatch(loadPairs("fixtures/data/stories/test.jsonl", baseDir, { limit: 16 }));
const H = base.config.hiddenSize;
const [hb, ht] = [residAfter(base, batch, layer), residAfter(tuned, batch, layer)];
const diff = tf.sub(ht, hb);
const d = diff.dataSync();
tf.dispose([hb, ht, diff]);
const meanDiff = new Float64Array(H);
let n = 0;
batch.ids.forEach((_, r) => {
  for (let t = batch.respStart[r]!; t < batch.lengths[r]!; t++, n++)
    for (let j = 0; j < H; j++) meanDiff[j]! += d[(r * batch.T + t) * H + j]!;
});
const direction = Float32Array.from(meanDiff, (x) => x / n);

const prompt = tok.encode("Once upon a time, Tom saw his sister crying in the garden.");
const stopAt = [2]; // the model's EOS
const hooks = steeringHooks(base.config, { layer, direction, beta });
const text = (out: number[]) => tok.decode([...prompt, ...out], { skipSpecialTokens: true });
console.log(
  `direction: mean h_tuned - h_base at layer ${layer} over ${n} response tokens, norm ${Math.hypot(...direction).toFixed(6)}`,
);
console.log(`unsteered: ${JSON.stringify(text(greedy(base, prompt, steps, { stopAt })))}`);
console.log(`steered (beta ${beta}): ${JSON.stringify(text(greedy(base, prompt, steps, { stopAt, hooks })))}`);
console.log(`tuned model: ${JSON.stringify(text(greedy(tuned, prompt, steps, { stopAt })))}`);
[base, tuned].forEach(disposeModel);
