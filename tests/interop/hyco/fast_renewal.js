// Preloaded (node --require) by the renewal test: Microsoft's clients renew
// their token every hour (setInterval of 3600000 ms); this runs such hourly
// timers every second instead, so that a renewal happens within the test.
// The packages themselves stay unmodified.
'use strict';
const setIntervalOriginal = global.setInterval;
global.setInterval = (fn, ms, ...args) => setIntervalOriginal(fn, ms >= 3600000 ? 1000 : ms, ...args);
