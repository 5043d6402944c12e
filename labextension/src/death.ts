/**
 * The death dialog: when a contained kernel is killed by the OOM killer or a signal, say why
 * (the runtime's reason, e.g. "killed: out of memory (limit 512 MiB, peak 511 MiB)") and offer
 * a restart. The restarted kernel keeps its container's writable layer (the provisioner's
 * `cleanup(restart=True)`), which the dialog says.
 *
 * Owns: watching each notebook's kernel status for 'autorestarting'/'dead'. Must not: restart
 * on its own (the server's restarter may already be doing it; the user decides otherwise).
 */
import { Dialog, ISessionContext, showDialog } from '@jupyterlab/apputils';
import { NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { h } from './dom';
import { Death, deathText, deathWorthADialog } from './format';
import { containerOf, kernelIdOf } from './kernels';

/** How long to wait for the runtime to record a death after Lab saw the kernel go. */
const DEATH_RECORD_WAIT_MS = 4000;

export function watchDeaths(panel: NotebookPanel): void {
  const context = panel.sessionContext;
  let checking = false;
  const onStatus = (_: ISessionContext, status: string): void => {
    if ((status === 'autorestarting' || status === 'dead') && !checking) {
      const kernelId = kernelIdOf(context);
      if (kernelId) {
        checking = true;
        void checkDeath(panel, kernelId, status).finally(() => (checking = false));
      }
    }
  };
  context.statusChanged.connect(onStatus);
  panel.disposed.connect(() => context.statusChanged.disconnect(onStatus));
}

async function checkDeath(panel: NotebookPanel, kernelId: string, status: string): Promise<void> {
  const first = await containerOf(kernelId).catch(() => null);
  if (!first?.contained) {
    return;
  }
  // the kernel restarter notices a death within seconds; the runtime records it as it reaps
  const deadline = Date.now() + DEATH_RECORD_WAIT_MS;
  let death: Death | null | undefined = null;
  for (;;) {
    const answer = await containerOf(kernelId, { fresh: true }).catch(() => null);
    death = answer?.death;
    if (deathWorthADialog(death) || Date.now() > deadline) {
      break;
    }
    await new Promise(resolve => setTimeout(resolve, 500));
  }
  if (!death || !deathWorthADialog(death) || panel.isDisposed) {
    return;
  }
  await showDeathDialog(panel, death, status === 'dead');
}

/**
 * Closes JupyterLab's own "Kernel Restarting ... appears to have died" dialog for this notebook:
 * dialogs queue (one at a time), and this one says less than ours, which would wait behind it.
 */
function dismissGenericRestartDialog(panel: NotebookPanel): void {
  const path = panel.sessionContext.session?.path ?? panel.context.path;
  Dialog.tracker.forEach(dialog => {
    const text = dialog.node.textContent ?? '';
    if (!dialog.isDisposed && text.includes('appears to have died') && text.includes(path)) {
      dialog.resolve();
    }
  });
}

export async function showDeathDialog(panel: NotebookPanel, death: Death, dead: boolean): Promise<void> {
  const text = deathText(death);
  dismissGenericRestartDialog(panel);
  const body = h('div', { className: 'jc-death' },
    h('p', { className: 'jc-death-reason' }, text.body),
    h('p', { className: 'jc-death-hint' }, text.hint),
    h('p', { className: 'jc-death-state' }, dead
      ? 'The kernel is dead.'
      : 'Jupyter is restarting the kernel in the same container.'));
  const restart = Dialog.warnButton({ label: 'Restart kernel' });
  const result = await showDialog({
    title: text.title,
    body: new Widget({ node: body }),
    buttons: dead ? [Dialog.cancelButton({ label: 'Close' }), restart] : [Dialog.okButton({ label: 'OK' }), restart]
  });
  if (result.button.label === 'Restart kernel') {
    await panel.sessionContext.restartKernel();
  }
}
