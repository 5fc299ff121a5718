"""PCI: config space and the host bridge, the virtio 1.0 PCI modern
transport (§4.1), the device interface and the bus, one module per role.

=================  ====================================================
``config``         PCI constants, conf1 kernel (``conf1_access``), the
                   config-space builder with its permission masks, the
                   host bridge
``device``         what a device gives the transport: ``VirtioDevice``,
                   ``QueueContext``, ``IrqAllocator``
``transport``      the virtio-pci modern transport: BAR0 layout and
                   kernels, driver rules (``RULES``, ``E_*``,
                   ``BadDriver``), ``Transport``
``bus``            ``Bus``: the port bus (conf1, compiled UART/CMOS/reset
                   ports, Python handlers), BAR decode, interrupts,
                   the port/MMIO dispatch kernels over its flat tables
=================  ====================================================

Imports inside the package point down that list (config -> device ->
transport -> bus).  Interrupt delivery (INTx, MSI-X) is ``lguest_jit.irq``,
a layer below the queue engine.  Every public name of the four modules is
importable from ``lguest_jit.pci`` (tests/test_layers.py checks it), as
are the MSI-X table fields the transport keeps (from ``irq``).
"""
from ..irq import (  # noqa: F401
    ISR_CONFIG, MSIX_CTRL_MASKBIT, MV_ADDR_HI, MV_ADDR_LO, MV_CTRL, MV_DATA, MV_FD, MV_PENDING, MX_ENABLED,
    MX_INTX_FD, MX_MASKED, MX_VECTORS, VIRTIO_MSI_NO_VECTOR)
from .config import (  # noqa: F401
    COMMAND_WRITABLE, CONFIG_ADDRESS, CONFIG_DATA, C_ADDR, C_FIELDS, HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR, H_BAR0,
    H_CFG_DATA, H_COMMAND, H_MSIX, H_NONE, MAX_SLOTS, MSIX_ENTRY_SIZE, PCI_BASE_ADDRESS_0, PCI_BIST,
    PCI_CACHE_LINE_SIZE, PCI_CAPABILITY_LIST, PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, PCI_CFG_SPACE_SIZE,
    PCI_CLASS_DEVICE, PCI_CLASS_PROG, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_IO, PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY, PCI_COMMAND_PARITY, PCI_COMMAND_SERR, PCI_DEVICE_ID, PCI_HEADER_TYPE, PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN, PCI_LATENCY_TIMER, PCI_MSIX_CAP_LEN, PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL, PCI_MSIX_FLAGS_QSIZE, PCI_MSIX_PBA, PCI_MSIX_TABLE, PCI_REVISION_ID, PCI_ROM_ADDRESS,
    PCI_STATUS, PCI_STATUS_CAP_LIST, PCI_SUBSYSTEM_ID, PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID, P_CFG, P_HOOK,
    P_PLANES, P_REGION, P_WMASK, REGION_UNUSED, ConfigBuilder, HostBridge, conf1_access, read_le, size_mask,
    write_le)
from .device import (  # noqa: F401
    IrqAllocator, QueueContext, VirtioDevice)
from .transport import (  # noqa: F401
    ACKNOWLEDGE, A_CONFIG_WRITE, A_DRIVER_OK, A_MSIX_ROUTE, A_MSIX_UNMASK, A_NONE, A_NOTIFY, A_QUEUE_ENABLE,
    A_QUEUE_VECTOR, A_RESET, A_STATUS, BAR0_SHIFT, BAR0_SIZE, B_CFG, B_ISR, COMMON_FIELD_NAMES, COMMON_LEN,
    COMMON_OFF, DEVCFG_MAX, DEVCFG_OFF, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, E_BAR_RANGE, E_CFG_WINDOW,
    E_CONFIG_WRITE, E_DEVICE, E_DRIVER_OK_WITHOUT_FEATURES_OK, E_ENABLE_AFTER_DRIVER_OK, E_ENABLE_ZERO,
    E_FEATURES_OK_NOT_REREAD, E_FEATURE_AFTER_FEATURES_OK, E_FEATURE_BEFORE_DRIVER, E_FEATURE_NOT_OFFERED,
    E_FEATURE_READ_BEFORE_DRIVER, E_ISR_WRITE, E_MSIX, E_MSIX_ACCESS, E_NOTIFY_EARLY, E_NOTIFY_QUEUE,
    E_QUEUE_LAYOUT, E_QUEUE_LIVE, E_QUEUE_SIZE_VALUE, E_READ_ONLY, E_SETUP_BEFORE_FEATURES_OK, E_STATUS_CLEAR,
    E_STATUS_TRANSITION, E_WIDTH, FAILED, FEATURES_OK, FIELD_AT, FIELD_START, FIELD_WIDTH, F_DFEATURE, F_DFSELECT,
    F_GEN, F_GFEATURE, F_GFSELECT, F_MSIX, F_NUMQ, F_QDESC_HI, F_QDESC_LO, F_QDEVICE_HI, F_QDEVICE_LO,
    F_QDRIVER_HI, F_QDRIVER_LO, F_QENABLE, F_QMSIX, F_QNOTIFY_OFF, F_QSELECT, F_QSIZE, F_STATUS, IGNORE, ISR_LEN,
    ISR_OFF, MAX_QUEUES, MSIX_FIELDS, MSIX_MAX_VECTORS, MSIX_PBA_OFF, MSIX_TABLE_OFF, NEEDS_RESET, NOTIFY_OFF,
    NOTIFY_STRIDE, PROCEED, QC_DESC_HI, QC_DESC_LO, QC_DEVICE_HI, QC_DEVICE_LO, QC_DRIVER_HI, QC_DRIVER_LO,
    QC_ENABLE, QC_FIELDS, QC_MAX, QC_MSIX, QC_NOTIFY_OFF, QC_SIZE, RULES, S_CFG_LEN, S_DFSELECT, S_DRIVER_HI,
    S_DRIVER_LO, S_FIELDS, S_FOK_UNREAD, S_GENERATION, S_GFSELECT, S_ISR_READS, S_MSIX_CONFIG, S_NUM_QUEUES,
    S_N_ACCESSES, S_OFFER_HI, S_OFFER_LO, S_QSELECT, S_SINGLE_NOTIFY, S_STATUS, VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_DEVICE_BASE, VIRTIO_PCI_SUBSYS_DEVICE, VIRTIO_PCI_VENDOR, BadDriver, Transport, bar0_access)
from .bus import (  # noqa: F401
    KSTATE_ROWS, KSTATE_WIDTH, M_DEVCFG, M_ISR, M_MSIX_PBA, M_MSIX_TABLE, M_NAMES, M_NOTIFY, M_OTHER, M_REGS,
    PAGE_FALLBACK, PAGE_SLOTS, PD_ACTION, PD_ARG, PD_ERR, PD_FIELDS, PD_INDEX, PD_OFF, PD_ONE, PD_R, PD_SIZE,
    PD_SLOT, PD_STATUS, PD_VALUE, PD_WRITE, PK_CMOS, PK_CONF1, PK_NONE, PK_PYTHON, PK_RESET, PK_UART, PORT_KINDS,
    PT_FIRST, PT_KIND, PT_LAST, PT_ROW, RESET_VALUE, ST_BAR_SLOW, ST_DONE, ST_PYTHON, T_BYTES, T_CONF, T_KSTATE,
    T_MMIO_COUNTS, T_MSIX, T_NOTIFY_FD, T_PAGE_SLOT, T_PORTS, T_PORT_COUNTS, T_REGS, T_SPACE, Bus, mmio_access,
    port_access)
