// A model by its Hugging Face id, read from the local Hub cache where Python's huggingface_hub put it
// (models--org--name/{refs,snapshots,blobs}): resolveModel gives the snapshot folder, which loads as any folder.
// With HF_HUB_OFFLINE=1 nothing touches the network; without it, missing files are downloaded into that cache.
//   HF_HUB_OFFLINE=1 npx tsx examples/hub-cache.ts meta-llama/Llama-3.2-1B [revision]
import { hubSourceOf, initBackend, loadModel, margins, resolveModel } from "prefprobe";

await initBackend();
const [id = "meta-llama/Llama-3.2-1B", revision] = process.argv.slice(2);
const dir = await resolveModel(id, { revision, onInfo: (line) => console.error(line) });
const from = hubSourceOf(dir)!;
console.log(`${id}: ${from.repo} at commit ${from.commit}`);
console.log(`snapshot ${dir}`);

// the model carries its folder's tokenizer, so text pairs score in one call
const model = await loadModel(dir);
const [m] = margins(model, [{ prompt: "Tom was sad.", chosen: " Sue hugged him.", rejected: " Sue laughed." }]);
console.log(`margin ${m!.toFixed(6)}`);
