// Writes the stories-domain preference pairs that the demo tunes and analyses: a story opening in
// TinyStories style, a kind continuation (chosen) and an unkind one (rejected). Deterministic for a seed.
// Run: npx tsx scripts/make-story-pairs.ts [outDir] [count] [seed]
import * as fs from "node:fs";
import * as path from "node:path";
import { permutation, seededRandom } from "../src/stats/stats.js";

const outDir = process.argv[2] ?? "fixtures/data/stories";
const count = Number(process.argv[3] ?? 400);
const seed = Number(process.argv[4] ?? 1);
const rand = seededRandom(seed);
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;

const girls = ["Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Sara", "Amy", "Jane", "Kitty"];
const boys = ["Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Joe", "Bob", "Timmy"];
const places = [
  "the park",
  "the garden",
  "the beach",
  "school",
  "the forest",
  "the farm",
  "the playground",
  "the shop",
  "the river",
  "the zoo",
];
const friends = [
  "a boy",
  "a girl",
  "a little dog",
  "a small cat",
  "an old man",
  "a baby bird",
  "a bunny",
  "a duck",
  "her friend",
  "a new kid",
];

/** A situation: what goes wrong for the other character, then a kind and an unkind reaction. X = hero, Y = other. */
interface Situation {
  setup: string;
  kind: string[];
  unkind: string[];
}
const situations: Situation[] = [
  {
    setup: "Y dropped a {obj} and could not reach it.",
    kind: [
      "X picked up the {obj} and gave it back. Y smiled and said thank you.",
      "X helped Y get the {obj}. They played together all day.",
    ],
    unkind: ["X took the {obj} and ran away. Y started to cry.", "X kicked the {obj} far away and laughed at Y."],
  },
  {
    setup: "Y was sad and sitting alone.",
    kind: [
      "X sat next to Y and gave a big hug. Y felt happy again.",
      "X asked Y to play. Soon they were both laughing.",
    ],
    unkind: ["X pointed at Y and laughed. Y felt even more sad.", "X told Y to go away. Y cried all alone."],
  },
  {
    setup: "Y fell down and hurt a knee.",
    kind: ['X helped Y get up and said, "Are you okay?" Y said thank you.', "X ran to get help. Y felt better soon."],
    unkind: ['X laughed and said, "You are so silly!" Y cried.', "X walked away and did not help Y."],
  },
  {
    setup: "Y wanted to play with the {obj} too.",
    kind: [
      "X shared the {obj} with Y. They had lots of fun together.",
      'X said, "Let\'s play with it together!" Y was very happy.',
    ],
    unkind: ['X said, "No, it is mine!" and pushed Y away.', "X hid the {obj} so Y could not have it. Y was sad."],
  },
  {
    setup: "Y was hungry and had no food.",
    kind: [
      'X gave Y half of a {food}. Y said, "Thank you, you are kind!"',
      "X shared a {food} with Y. They ate it together and smiled.",
    ],
    unkind: [
      "X ate the whole {food} and did not share. Y was still hungry.",
      "X threw the {food} on the ground so Y could not eat it.",
    ],
  },
  {
    setup: "Y was lost and could not find home.",
    kind: [
      "X held Y's hand and helped find the way home. Y's mom was so happy.",
      'X said, "Don\'t worry, I will help you." They found home together.',
    ],
    unkind: ['X said, "That is not my problem," and left Y alone.', "X laughed at Y and ran off. Y was scared."],
  },
  {
    setup: "Y made a mess with the {obj}.",
    kind: [
      "X helped Y clean up. Then they played a fun game.",
      'X said, "It\'s okay, we can fix it together." Y smiled.',
    ],
    unkind: ["X yelled at Y and broke the {obj}.", "X told everyone that Y was bad. Y felt very sad."],
  },
  {
    setup: "Y was scared of the big dark tree.",
    kind: [
      'X said, "I will stay with you." Y was not scared anymore.',
      "X held Y's hand and they walked past the tree together.",
    ],
    unkind: ['X jumped out and shouted "Boo!" Y cried and ran away.', "X said Y was a baby and walked off."],
  },
  {
    setup: "Y could not build the {obj}.",
    kind: ["X showed Y how to do it. Together they built the {obj}.", "X helped Y try again. Y was proud and happy."],
    unkind: ["X knocked the {obj} down and laughed.", 'X said, "You can\'t do anything!" Y was sad.'],
  },
  {
    setup: "Y was cold and had no coat.",
    kind: [
      "X gave Y a warm {cloth}. Y felt warm and said thank you.",
      "X shared the {cloth} with Y. They both felt warm and happy.",
    ],
    unkind: ['X kept the {cloth} and said, "Go home!" Y was cold.', "X took Y's hat too and ran away laughing."],
  },
];
const objects = ["ball", "toy", "kite", "book", "doll", "block", "car", "boat"];
const foods = ["apple", "cookie", "sandwich", "cake", "banana"];
const cloths = ["coat", "scarf", "blanket", "hat"];

function fill(s: string, hero: string, other: string, vars: Record<string, string>): string {
  return s
    .replace(/\{(\w+)\}/g, (_, k: string) => vars[k]!)
    .replace(/\bX\b/g, hero)
    .replace(/\bY's\b/g, `${other}'s`)
    .replace(/\bY\b/g, other);
}
/** Capitalizes the first letter and every letter that starts a sentence. */
const cap = (s: string) =>
  (s[0]!.toUpperCase() + s.slice(1)).replace(/([.!?]"? )([a-z])/g, (_, p: string, c: string) => p + c.toUpperCase());

const seen = new Set<string>();
const pairs: Array<{ prompt: string; chosen: string; rejected: string }> = [];
for (let tries = 0; pairs.length < count && tries < count * 50; tries++) {
  const girl = rand() < 0.5;
  const hero = pick(girl ? girls : boys);
  const other = pick(friends);
  const place = pick(places);
  const sit = pick(situations);
  const vars = { obj: pick(objects), food: pick(foods), cloth: pick(cloths) };
  const otherName = other.replace(/^her /, girl ? "her " : "his ");
  const prompt = `Once upon a time, there was a ${girl ? "little girl" : "little boy"} named ${hero}. One day, ${hero} went to ${place}. There ${hero} saw ${otherName}. ${cap(fill(sit.setup, hero, otherName.replace(/^an? /, "the "), vars))}`;
  const key = `${prompt}`;
  if (seen.has(key)) continue;
  seen.add(key);
  const other2 = otherName.replace(/^an? /, "the ");
  // each response starts with the space that separates it from the prompt: prompt + response is the story's text
  pairs.push({
    prompt,
    chosen: " " + cap(fill(pick(sit.kind), hero, other2, vars)),
    rejected: " " + cap(fill(pick(sit.unkind), hero, other2, vars)),
  });
}
const order = permutation(pairs.length, rand);
const nTest = Math.round(pairs.length * 0.3);
const test = order.slice(0, nTest).map((i) => pairs[i]!);
const train = order.slice(nTest).map((i) => pairs[i]!);
fs.mkdirSync(outDir, { recursive: true });
fs.writeFileSync(path.join(outDir, "train.jsonl"), train.map((p) => JSON.stringify(p)).join("\n") + "\n");
fs.writeFileSync(path.join(outDir, "test.jsonl"), test.map((p) => JSON.stringify(p)).join("\n") + "\n");
console.log(`wrote ${train.length} train and ${test.length} test pairs to ${outDir}`);
