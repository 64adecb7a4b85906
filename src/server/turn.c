/* turn.c: see issue 14; filled in by the next commits */
#include "jobloop.h"
