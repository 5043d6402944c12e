/**
 * The extension's icons (LabIcon, so they follow the theme's colours).
 */
import { LabIcon } from '@jupyterlab/ui-components';

import containerSvg from '../style/icons/container.svg';
import snapshotSvg from '../style/icons/snapshot.svg';

export const containerIcon = new LabIcon({ name: 'jupyter-contain:container', svgstr: containerSvg });
export const snapshotIcon = new LabIcon({ name: 'jupyter-contain:snapshot', svgstr: snapshotSvg });
