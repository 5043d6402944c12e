// Builds the prebuilt extension into ../jupyter_contain/labextension with @jupyterlab/builder,
// against the core metadata of the JupyterLab release this package pins (@jupyterlab/core-meta,
// the same version as the `lab` extra's jupyterlab). Needs Node and node_modules only: no
// Python and no JupyterLab install, so scripts/setup can build before `pip install -e` copies
// the result to share/jupyter/labextensions/jupyter-contain/.
// `jupyter labextension build .` does the same when JupyterLab is installed.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.resolve(__dirname, '..');
const pkg = require(path.join(root, 'package.json'));
const out = path.resolve(root, pkg.jupyterlab.outputDir);
const coreMeta = require.resolve('@jupyterlab/core-meta/core.package.json', { paths: [root] });
const builder = require.resolve('@jupyterlab/builder/lib/build-labextension.js', { paths: [root] });

// the builder reads <core-path>/package.json (singletons and shared versions of the core)
const coreDir = fs.mkdtempSync(path.join(os.tmpdir(), 'jc-lab-core-'));
let status = 1;
try {
  fs.copyFileSync(coreMeta, path.join(coreDir, 'package.json'));
  const args = [builder, '--core-path', coreDir, ...process.argv.slice(2), root];
  const run = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
  status = run.status === null ? 1 : run.status;
} finally {
  fs.rmSync(coreDir, { recursive: true, force: true });
}
if (status === 0) {
  // tells JupyterLab the extension came with the Python package (and how to remove it)
  fs.copyFileSync(path.join(root, 'install.json'), path.join(out, 'install.json'));
}
process.exit(status);
