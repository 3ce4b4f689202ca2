module partialfc.dev/examples/go/identify

go 1.19

require partialfc.dev/bindings/go/partialfc v0.0.0

replace partialfc.dev/bindings/go/partialfc => ../../../bindings/go/partialfc
