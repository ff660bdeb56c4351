// Validates an AsyncAPI document with the independent @asyncapi/parser.
//   node validate.js <node_modules dir> <asyncapi.json>
// $refs such as ./jsonschema/X.json resolve relative to the document's own path.
// Prints every diagnostic; exits 1 if any has error severity, 2 on a crash, 0 otherwise.
"use strict";
const path = require("path");
const { createRequire } = require("module");

async function main() {
  const [modulesDir, documentPath] = process.argv.slice(2);
  if (!modulesDir || !documentPath) {
    console.error("usage: node validate.js <node_modules dir> <asyncapi.json>");
    return 2;
  }
  const load = createRequire(path.join(path.resolve(modulesDir), "noop.js"));
  const { Parser, fromFile, DiagnosticSeverity } = load("@asyncapi/parser");
  const parser = new Parser();
  const source = path.resolve(documentPath);
  const { document, diagnostics } = await fromFile(parser, source).parse();
  const names = ["error", "warning", "information", "hint"];
  let errors = 0;
  for (const d of diagnostics) {
    if (d.severity === DiagnosticSeverity.Error) errors += 1;
    const where = (d.path || []).join("/");
    console.log(`${names[d.severity] || d.severity} ${d.code} at /${where}: ${d.message}`);
  }
  if (errors > 0 || !document) {
    console.log(`INVALID: ${errors} error(s) in ${source}`);
    return 1;
  }
  const channels = document.channels().length;
  const operations = document.operations().length;
  const messages = document.components().messages().length;
  console.log(
    `VALID AsyncAPI ${document.version()}: ${channels} channels, ${operations} operations, ` +
      `${messages} messages, ${diagnostics.length} non-error diagnostic(s)`,
  );
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err && err.stack ? err.stack : err);
    process.exit(2);
  },
);
