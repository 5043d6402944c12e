/**
 * The jupyter-contain JupyterLab 4 extension: wires the widgets into the application.
 *
 * Owns: plugin activation (status bar meter, Containers panel, snapshot toolbar button,
 * death dialog, image record in notebook metadata, start options) and the settings. Must not: talk to
 * anything but the server extension's REST API (src/api.ts).
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { watchDeaths } from './death';
import { ContainerMeter } from './meter';
import { watchImageRecord } from './metadata';
import { ContainersPanel } from './panel';
import { SnapshotButtonExtension, snapshotNotebook } from './snapshot';
import { startWithOptionsCommand, watchStarts } from './startoptions';

const PLUGIN_ID = 'jupyter-contain:plugin';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Resource meter, Containers panel, snapshot button and death dialog for contained kernels.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILabShell, IStatusBar, ISettingRegistry, ICommandPalette],
  activate: async (app: JupyterFrontEnd, tracker: INotebookTracker, labShell: ILabShell | null,
                   statusBar: IStatusBar | null, settingRegistry: ISettingRegistry | null,
                   palette: ICommandPalette | null): Promise<void> => {
    // first, before any await: a notebook's first kernel start is taken over before its
    // session starts one by itself (start options), so this must see every notebook
    const specs = app.serviceManager.kernelspecs;
    tracker.widgetAdded.connect((_, nbPanel) => watchStarts(nbPanel, specs));
    let refreshMs = 3000;
    if (settingRegistry) {
      try {
        const settings = await settingRegistry.load(PLUGIN_ID);
        refreshMs = Math.max(1000, Number(settings.composite.refreshRate ?? 3000));
      } catch (error) {
        console.warn('jupyter-contain: settings not loaded, using defaults', error);
      }
    }
    const hooks = {
      kernelspecsChanged: () => void app.serviceManager.kernelspecs.refreshSpecs(),
      openKernel: (name: string) => void app.commands.execute('notebook:create-new', { kernelName: name })
    };

    if (statusBar) {
      const meter = new ContainerMeter(tracker, refreshMs);
      statusBar.registerStatusItem('jupyter-contain:meter', {
        item: meter,
        align: 'left',
        rank: 1,
        isActive: () => meter.contained,
        activeStateChanged: meter.stateChanged
      });
    }

    const panel = new ContainersPanel(hooks);
    if (labShell) {
      labShell.add(panel, 'left', { rank: 650 });
    } else {
      app.shell.add(panel, 'left', { rank: 650 });
    }

    app.docRegistry.addWidgetExtension('Notebook', new SnapshotButtonExtension(hooks));
    const watch = (nbPanel: NotebookPanel) => {
      watchDeaths(nbPanel);
      watchImageRecord(nbPanel, hooks.kernelspecsChanged);
    };
    tracker.forEach(watch); // notebooks opened while the settings loaded
    tracker.widgetAdded.connect((_, nbPanel) => watch(nbPanel));

    app.commands.addCommand('jupyter-contain:open-panel', {
      label: 'Show Containers Panel',
      execute: () => app.shell.activateById(panel.id)
    });
    app.commands.addCommand('jupyter-contain:snapshot', {
      label: 'Snapshot Kernel Container',
      isEnabled: () => tracker.currentWidget !== null,
      execute: () => tracker.currentWidget ? snapshotNotebook(tracker.currentWidget, hooks) : undefined
    });
    app.commands.addCommand('jupyter-contain:start-with-options', {
      label: 'Start Contained Kernel with Options…',
      caption: 'Pick a contained kernel and its memory, CPUs, network and image tag for this notebook',
      isEnabled: () => tracker.currentWidget !== null,
      execute: () => tracker.currentWidget ? startWithOptionsCommand(tracker.currentWidget, specs) : undefined
    });
    palette?.addItem({ command: 'jupyter-contain:open-panel', category: 'Containers' });
    palette?.addItem({ command: 'jupyter-contain:start-with-options', category: 'Containers' });
    palette?.addItem({ command: 'jupyter-contain:snapshot', category: 'Containers' });
    // the browser tests read this mark to measure the extension's load time
    performance.mark('jupyter-contain:activated');
  }
};

export default plugin;
