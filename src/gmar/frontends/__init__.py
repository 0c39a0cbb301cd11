"""The front ends: the command line (:mod:`~gmar.frontends.cli`), the demo, the web page
(:mod:`~gmar.frontends.app`), the benchmark and the supported-models table. They parse, call the
library and write files or pages; the core never imports them."""
