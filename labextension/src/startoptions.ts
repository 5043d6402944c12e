/**
 * Start options: a small dialog (memory, CPUs, network, image tag) before a contained kernel
 * starts, for kernelspecs installed with `--start-dialog`, for notebooks that recorded their
 * choice (`metadata.jupyter_contain.start_options`, reused when reopened), and on demand from
 * the command "Start Contained Kernel with Options…".
 *
 * How a start carries options: Jupyter's own kernel and session APIs take only a kernelspec
 * name, so the notebook's session initialization first waits for the choice, the kernel is
 * started through the server extension's POST kernels (which checks the values against the
 * server's ceilings; the provisioner validates them again), and the session then attaches to
 * that kernel id. A notebook that joins a running session keeps that session's kernel.
 *
 * Owns: the dialog, the start hook per notebook and the recorded choice. Must not: trust the
 * recorded values (the server checks them), or start a kernel for a non-contained kernelspec.
 */
import { Dialog, ISessionContext, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { PathExt } from '@jupyterlab/coreutils';
import { NotebookPanel } from '@jupyterlab/notebook';
import { KernelSpec } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

import { ContainAPIError, ServerConfig, listImages, serverConfig, startKernel } from './api';
import { h } from './dom';
import { formatBytes } from './format';
import { METADATA_KEY } from './metadata';
import {
  StartLimits, StartOptions, checkStartOptions, compactOptions, describeOptions, recordedStartOptions, tagOf, tagsFor
} from './options';

const PROVISIONER = 'jupyter-contain';

/** A contained kernelspec as the Lab's kernelspec manager knows it (synchronously). */
interface ContainedSpec {
  name: string;
  displayName: string;
  image: string;
  memory: string | null;
  cpus: string | null;
  network: string;
  dialog: boolean;
}

function containedSpec(specs: KernelSpec.ISpecModels | null | undefined, name: string | undefined): ContainedSpec | null {
  const spec = name ? specs?.kernelspecs[name] : undefined;
  const meta = (spec?.metadata ?? {}) as Record<string, any>;
  const prov = meta.kernel_provisioner;
  if (!spec || !prov || prov.provisioner_name !== PROVISIONER) {
    return null;
  }
  const config = (prov.config ?? {}) as Record<string, unknown>;
  const text = (v: unknown) => (typeof v === 'string' && v !== '' ? v : typeof v === 'number' ? String(v) : null);
  return {
    name: spec.name,
    displayName: spec.display_name,
    image: text(config.image) ?? '',
    memory: text(config.memory),
    cpus: text(config.cpus),
    network: text(config.network) ?? 'none',
    dialog: meta.jupyter_contain?.start_dialog === true
  };
}

function containedSpecs(specs: KernelSpec.ISpecModels | null | undefined): ContainedSpec[] {
  return Object.keys(specs?.kernelspecs ?? {}).map(n => containedSpec(specs, n)).filter((s): s is ContainedSpec => s !== null);
}

function limitsOf(config: ServerConfig | null): StartLimits {
  return {
    max_memory: config?.limits.max_memory ?? null,
    max_cpus: config?.limits.max_cpus ?? null,
    networks: config?.limits.networks ?? ['none', 'bridge']
  };
}

type FormValue = { spec: string; options: StartOptions };

/** The dialog's body: the fields, the kernelspec's values as placeholders, errors as you type. */
class StartOptionsForm extends Widget implements Dialog.IBodyWidget<FormValue> {
  constructor(private readonly specs: ContainedSpec[], initial: ContainedSpec, options: StartOptions,
              private readonly limits: StartLimits, private readonly imageNames: string[]) {
    super();
    this.addClass('jc-start-form');
    for (const spec of specs) {
      this.specSelect.append(h('option', { value: spec.name, selected: spec.name === initial.name }, spec.displayName));
    }
    for (const net of ['none', 'bridge', 'host']) {
      this.network.append(h('option', { value: net, disabled: !limits.networks.includes(net) },
        net === 'none' ? 'none (loopback only)' : net));
    }
    this.memory.value = options.memory ?? '';
    this.cpus.value = options.cpus ?? '';
    const field = (label: string, input: HTMLElement, error: HTMLElement, hint: HTMLElement | null = null) =>
      h('div', { className: 'jc-start-field' },
        h('label', { className: 'jc-field' }, h('span', {}, label), input),
        h('div', { className: 'jc-start-sub' }, hint, error));
    this.node.append(
      ...(specs.length > 1 ? [field('Kernel', this.specSelect, h('span'))] : []),
      field('Memory', this.memory, this.errors.memory, this.hints.memory),
      field('CPUs', this.cpus, this.errors.cpus, this.hints.cpus),
      field('Network', this.network, this.errors.network),
      field('Image tag', this.tag, this.errors.tag, this.hints.tag),
      h('p', { className: 'jc-start-note' }, 'Empty fields keep the kernelspec\'s values. The server checks every value again.'));
    this.showSpec(initial, options);
    for (const input of [this.memory, this.cpus, this.network, this.tag]) {
      input.addEventListener('input', () => this.check());
      input.addEventListener('change', () => this.check());
    }
    this.specSelect.addEventListener('change', () => {
      const spec = this.specs.find(s => s.name === this.specSelect.value);
      if (spec) {
        this.showSpec(spec, {});
      }
    });
  }

  /** Per-field errors of the current values (empty: fine). */
  check(): Partial<Record<keyof StartOptions, string>> {
    const errors = checkStartOptions(this.options(), this.limits, this.tags);
    for (const key of ['memory', 'cpus', 'network', 'tag'] as (keyof StartOptions)[]) {
      this.errors[key].textContent = errors[key] ?? '';
    }
    return errors;
  }

  getValue(): FormValue {
    return { spec: this.spec.name, options: this.options() };
  }

  private options(): StartOptions {
    return compactOptions({
      memory: this.memory.value,
      cpus: this.cpus.value,
      // the kernelspec's own value is no choice: sent only when it differs
      network: this.network.value !== this.spec.network ? this.network.value : undefined,
      tag: this.tag.value !== (tagOf(this.spec.image) ?? '') ? this.tag.value : undefined
    });
  }

  private showSpec(spec: ContainedSpec, options: StartOptions): void {
    this.spec = spec;
    const maxMem = this.limits.max_memory;
    this.memory.placeholder = spec.memory ? `kernelspec: ${spec.memory}` : 'kernelspec: no limit';
    this.hints.memory.textContent = maxMem !== null ? `at most ${formatBytes(maxMem)}` : 'e.g. 512m, 2g; none: no limit';
    this.cpus.placeholder = spec.cpus ? `kernelspec: ${spec.cpus}` : 'kernelspec: no limit';
    this.hints.cpus.textContent = this.limits.max_cpus !== null ? `at most ${this.limits.max_cpus}` : 'e.g. 0.5, 2';
    this.network.value = options.network ?? spec.network;
    this.tags = tagsFor(spec.image, this.imageNames);
    const own = tagOf(spec.image);
    if (own !== null && !this.tags.includes(own)) {
      this.tags.unshift(own);
    }
    this.tag.replaceChildren(...this.tags.map(t => h('option', { value: t }, t === own ? `${t} (kernelspec)` : t)));
    this.tag.value = options.tag && this.tags.includes(options.tag) ? options.tag : own ?? '';
    this.hints.tag.textContent = `${spec.image.split(':')[0]}: ${this.tags.length} tag(s) in the store`;
    this.check();
  }

  private spec!: ContainedSpec;
  private tags: string[] = [];
  private readonly specSelect = h('select', { className: 'jp-mod-styled jc-start-spec', 'aria-label': 'Kernel' });
  private readonly memory = h('input', { className: 'jp-mod-styled jc-start-memory', type: 'text', spellcheck: 'false', 'aria-label': 'Memory' });
  private readonly cpus = h('input', { className: 'jp-mod-styled jc-start-cpus', type: 'text', spellcheck: 'false', 'aria-label': 'CPUs' });
  private readonly network = h('select', { className: 'jp-mod-styled jc-start-network', 'aria-label': 'Network' });
  private readonly tag = h('select', { className: 'jp-mod-styled jc-start-tag', 'aria-label': 'Image tag' });
  private readonly hints = {
    memory: h('span', { className: 'jc-field-hint' }),
    cpus: h('span', { className: 'jc-field-hint' }),
    tag: h('span', { className: 'jc-field-hint' })
  };
  private readonly errors: Record<keyof StartOptions, HTMLElement> = {
    memory: h('span', { className: 'jc-field-error jc-start-error-memory' }),
    cpus: h('span', { className: 'jc-field-error jc-start-error-cpus' }),
    network: h('span', { className: 'jc-field-error jc-start-error-network' }),
    tag: h('span', { className: 'jc-field-error jc-start-error-tag' })
  };
}

/**
 * Asks for start options; resolves to the choice, {options: {}} for "Skip" (the kernelspec's
 * values), or null when the dialog was dismissed. Invalid values keep the dialog open.
 */
async function askStartOptions(specs: ContainedSpec[], initial: ContainedSpec, options: StartOptions,
                               title: string): Promise<FormValue | null> {
  const [config, images] = await Promise.all([
    serverConfig().catch(() => null),
    listImages().catch(() => [])
  ]);
  const names = images.map(i => i.name);
  let shown = initial;
  for (;;) {
    // a new body each time: a closed dialog disposes its body
    const form = new StartOptionsForm(specs, shown, options, limitsOf(config), names);
    const result = await showDialog<FormValue>({
      title,
      body: form,
      buttons: [Dialog.cancelButton({ label: 'Skip' }), Dialog.okButton({ label: 'Start' })],
      focusNodeSelector: '.jc-start-memory'
    });
    if (!result.button.accept) {
      // Skip: the kernelspec's values, as a start without the dialog; Escape: no kernel
      return result.button.label === 'Skip' ? { spec: shown.name, options: {} } : null;
    }
    const errors = form.check();
    if (Object.keys(errors).length === 0 && result.value) {
      return result.value;
    }
    // invalid: ask again with what was typed (the fields say what is wrong)
    shown = specs.find(s => s.name === result.value?.spec) ?? shown;
    options = result.value?.options ?? options;
  }
}

/** Starts the kernel with ``options`` and attaches the notebook's session to it. */
async function startWithOptions(panel: NotebookPanel, spec: string, options: StartOptions): Promise<void> {
  const dir = PathExt.dirname(panel.context.path);
  const started = await startKernel({ name: spec, ...(dir ? { path: dir } : {}), options });
  if (panel.isDisposed) {
    return;
  }
  await panel.sessionContext.changeKernel({ id: started.kernel.id });
  recordOptions(panel, started.options);
}

/** Records the choice in the notebook (or forgets an old one after a start with the kernelspec's values). */
function recordOptions(panel: NotebookPanel, options: StartOptions): void {
  const model = panel.model;
  if (!model) {
    return;
  }
  const old = model.getMetadata(METADATA_KEY);
  const base = old && typeof old === 'object' ? { ...(old as Record<string, unknown>) } : {};
  const had = recordedStartOptions(base);
  if (Object.keys(options).length) {
    if (describeOptions(had ?? {}) !== describeOptions(options)) {
      model.setMetadata(METADATA_KEY, { ...base, start_options: options as Record<string, string> });
    }
  } else if ('start_options' in base) {
    delete base.start_options;
    model.setMetadata(METADATA_KEY, base);
  }
}

async function reportFailure(error: unknown, spec: string): Promise<void> {
  const message = error instanceof ContainAPIError ? error.message : String(error);
  await showErrorMessage('Contained kernel not started', `${spec}: ${message}`);
}

/**
 * For one notebook: when its kernelspec asks for start options, or it recorded some, its first
 * kernel start goes through the server extension. Installed when the notebook widget is made,
 * before its document context initializes the session: that initialization waits for the
 * choice and then attaches to the kernel started with it (kernelPreference.id), so the session
 * is ready with its kernel as after any start (other extensions, e.g. ipywidgets' manager,
 * expect a kernel once the session context is ready).
 */
export function watchStarts(panel: NotebookPanel, specsManager: KernelSpec.IManager): void {
  const context = panel.sessionContext;
  const initialize = context.initialize.bind(context);
  context.initialize = async (): Promise<boolean> => {
    try {
      await takeOverStart(panel, context, specsManager);
    } catch (error) {
      console.warn('jupyter-contain: start options not applied', error);
    }
    return initialize();
  };
}

async function takeOverStart(panel: NotebookPanel, context: ISessionContext, specsManager: KernelSpec.IManager): Promise<void> {
  const model = panel.model;
  const preference = context.kernelPreference;
  if (panel.isDisposed || !model || preference.shouldStart === false || preference.canStart === false || preference.id) {
    return;
  }
  const spec = containedSpec(specsManager.specs, model.defaultKernelName || preference.name);
  const recorded = recordedStartOptions(model.getMetadata(METADATA_KEY));
  if (!spec || (!spec.dialog && !recorded)) {
    return;
  }
  // a notebook joining a running session (another tab, a reload) keeps that session's kernel
  const sessions = context.sessionManager;
  await sessions.ready;
  await sessions.refreshRunning();
  for (const running of sessions.running()) {
    if (running.path === panel.context.path) {
      return;
    }
  }
  let choice: FormValue | null = { spec: spec.name, options: recorded ?? {} };
  if (spec.dialog) {
    choice = await askStartOptions([spec], spec, recorded ?? {}, `Start ${spec.displayName}`);
  }
  if (choice === null || panel.isDisposed) {
    // dismissed: no kernel, as "No Kernel" in Jupyter's own picker
    context.kernelPreference = { ...context.kernelPreference, shouldStart: false };
    return;
  }
  try {
    const dir = PathExt.dirname(panel.context.path);
    const started = await startKernel({ name: choice.spec, ...(dir ? { path: dir } : {}), options: choice.options });
    context.kernelPreference = { ...context.kernelPreference, id: started.kernel.id };
    recordOptions(panel, started.options);
  } catch (error) {
    // the session then starts the kernelspec as it is: the notebook still gets a kernel
    await reportFailure(error, spec.displayName);
  }
}

/** The command: pick a contained kernel and its options for the current notebook (replaces its kernel). */
export async function startWithOptionsCommand(panel: NotebookPanel, specsManager: KernelSpec.IManager): Promise<void> {
  const specs = containedSpecs(specsManager.specs);
  if (!specs.length) {
    await showErrorMessage('No contained kernels', 'Install one first: jupyter contain kernelspec install IMAGE');
    return;
  }
  const current = panel.sessionContext.session?.kernel?.name ?? panel.sessionContext.kernelPreference.name;
  const initial = specs.find(s => s.name === current) ?? specs[0];
  const recorded = recordedStartOptions(panel.model?.getMetadata(METADATA_KEY)) ?? {};
  const choice = await askStartOptions(specs, initial, initial.name === current ? recorded : {},
    'Start Contained Kernel with Options');
  if (choice === null) {
    return;
  }
  const spec = specs.find(s => s.name === choice.spec) ?? initial;
  try {
    await startWithOptions(panel, spec.name, choice.options);
  } catch (error) {
    await reportFailure(error, spec.displayName);
  }
}
