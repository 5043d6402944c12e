/**
 * Reproducibility: the notebook records the image its contained kernel runs
 * (`metadata.jupyter_contain = {image, digest, kernelspec}`), and a notebook reopened on a
 * kernel whose image digest differs from the recorded one says so, offering to pull the
 * recorded digest and install it as a kernel, or to record the new image.
 *
 * Owns: reading and writing `metadata.jupyter_contain`. Must not: change the notebook's
 * kernel by itself, or trust the recorded values (they come from a file anyone can edit:
 * a pull of `name@digest` is validated by the server like any reference).
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { followOperation, installKernelspec, listImages, startPull } from './api';
import { h, progressBar } from './dom';
import { ImageRecordMeta, digestMismatch, pinnedReference, shortDigest } from './format';
import { containerOf, kernelIdOf } from './kernels';

export const METADATA_KEY = 'jupyter_contain';

export function watchImageRecord(panel: NotebookPanel, onKernelspecsChanged: () => void): void {
  const context = panel.sessionContext;
  const seen = new Set<string>();
  const check = (): void => {
    const kernelId = kernelIdOf(context);
    if (!kernelId || seen.has(kernelId) || context.kernelDisplayStatus !== 'idle' || !panel.context.isReady) {
      return;
    }
    seen.add(kernelId);
    void record(panel, kernelId, onKernelspecsChanged).catch(error =>
      console.warn('jupyter-contain: could not record the image in the notebook', error));
  };
  context.statusChanged.connect(check);
  context.kernelChanged.connect(check);
  panel.disposed.connect(() => {
    context.statusChanged.disconnect(check);
    context.kernelChanged.disconnect(check);
  });
  void panel.context.ready.then(check);
}

function readRecord(panel: NotebookPanel): Partial<ImageRecordMeta> | null {
  const value = panel.model?.getMetadata(METADATA_KEY);
  return value && typeof value === 'object' ? (value as Partial<ImageRecordMeta>) : null;
}

function writeRecord(panel: NotebookPanel, record: ImageRecordMeta): void {
  const old = readRecord(panel);
  if (old && old.image === record.image && old.digest === record.digest && old.kernelspec === record.kernelspec) {
    return; // unchanged: do not mark the notebook dirty
  }
  panel.model?.setMetadata(METADATA_KEY, { ...(old ?? {}), ...record });
}

async function record(panel: NotebookPanel, kernelId: string, onKernelspecsChanged: () => void): Promise<void> {
  const answer = await containerOf(kernelId);
  if (!answer.contained || !answer.image || panel.isDisposed) {
    return;
  }
  const current: ImageRecordMeta = {
    image: answer.image.name,
    digest: answer.image.digest,
    kernelspec: answer.container?.kernel_name ?? panel.sessionContext.kernelPreference.name ?? undefined
  };
  const recorded = readRecord(panel);
  const mismatch = digestMismatch(recorded, { name: current.image, digest: current.digest });
  if (!mismatch) {
    writeRecord(panel, current);
    return;
  }
  const wanted = pinnedReference(String(recorded!.image ?? current.image), String(recorded!.digest));
  const images = await listImages().catch(() => []);
  const inStore = images.some(image => image.digest === recorded!.digest);
  const body = h('div', { className: 'jc-digest-warning' },
    h('p', {}, mismatch),
    h('p', {}, inStore
      ? `The recorded image (${shortDigest(recorded!.digest)}) is in the image store: install it as a kernel to run this notebook as it last ran.`
      : `The recorded image (${shortDigest(recorded!.digest)}) is not in the image store: pull ${wanted.split('@')[0]} at that digest to run this notebook as it last ran.`));
  const pinLabel = inStore ? 'Install recorded image as kernel' : 'Pull recorded image';
  const result = await showDialog({
    title: 'Notebook recorded a different image',
    body: new Widget({ node: body }),
    buttons: [
      Dialog.cancelButton({ label: 'Keep record' }),
      Dialog.okButton({ label: 'Record new image', displayType: 'default' }),
      Dialog.okButton({ label: pinLabel })
    ]
  });
  const label = result.button.label;
  if (label === 'Record new image') {
    writeRecord(panel, current);
  } else if (label === pinLabel) {
    await pinRecorded(wanted, !inStore, String(recorded!.digest), onKernelspecsChanged);
  }
}

/** Pulls (if needed) the recorded name@digest and installs it as a kernel, with a progress dialog. */
async function pinRecorded(reference: string, pull: boolean, digest: string, onKernelspecsChanged: () => void): Promise<void> {
  const status = h('div', { className: 'jc-pin' });
  const dialog = new Dialog({
    title: `Recorded image ${shortDigest(digest)}`,
    body: new Widget({ node: status }),
    buttons: [Dialog.okButton({ label: 'Close' })]
  });
  void dialog.launch();
  try {
    if (pull) {
      const op = await startPull(reference);
      const final = await followOperation(op, o => {
        status.replaceChildren(h('p', {}, `Pulling ${reference}`),
          progressBar(o.progress.stage || 'pull', o.progress.done, o.progress.total, o.state === 'succeeded'));
      });
      if (final.state !== 'succeeded') {
        throw new Error(final.error?.message ?? `pull ${final.state}`);
      }
    }
    // a name of its own (the default would be the image's usual kernel name, taken by the current kernel)
    const hex = digest.split(':').pop()!.slice(0, 12);
    const repo = reference.split('@')[0].split('/').pop() ?? 'image';
    const spec = await installKernelspec({
      image: reference,
      name: `pinned-${repo.replace(/[^a-z0-9._-]/g, '-')}-${hex}`,
      display_name: `Contained Python (${repo} @ ${hex})`
    });
    onKernelspecsChanged();
    status.replaceChildren(h('p', {}, `Installed kernel "${spec.display_name}" (${spec.name}) for ${reference}.`),
      h('p', {}, 'Pick it with Kernel > Change Kernel to run this notebook on the recorded image.'));
  } catch (error) {
    status.replaceChildren(h('p', { className: 'jc-error' }, `Could not pin ${reference}: ${(error as Error).message}`));
  }
}
